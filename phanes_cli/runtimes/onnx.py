"""The ONNX Runtime backends: the exported graphs of a bundle on the CPU or CUDA execution provider
(`onnxruntime`), and with the INT8 graphs that passed the export gate in place of their fp32 ones, on the CPU
(`onnxruntime-int8`, graphs from `runtimes.quantise`).

Sessions are built from the verified bytes of each graph (never re-read from disk after the check), with
every graph optimisation on and the intra-op thread count of the process, so a run uses what torch would.
"""

from __future__ import annotations

import onnxruntime as ort
import torch
from torch import Tensor

from phanes_cli.core.bundle import Bundle
from phanes_cli.runtimes.artefacts import RuntimeUnavailable, artefact_name, read_artefact, read_gate
from phanes_cli.runtimes.graphs import GRAPHS, GraphBackend, GraphSpec, numpy_feed

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
INT8_BACKEND = "onnxruntime-int8"


def providers_for(device: torch.device) -> list[str]:
    """Execution providers for a device; CUDA without ORT's CUDA provider is refused, not run on the CPU."""
    if device.type != "cuda":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise RuntimeUnavailable(f"onnxruntime {ort.__version__} has no CUDA execution provider "
                                 "(install onnxruntime-gpu)")
    return [(CUDA_PROVIDER, {"device_id": device.index or 0}), CPU_PROVIDER]  # type: ignore[list-item]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    # ORT's intra-op threads busy-wait after each run by default; the three sessions' pools then spin on the
    # cores that the torch pre/post-processing between the graphs needs (measured in docs/backends.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def int8_graph_files(bundle: Bundle, device: torch.device) -> dict[str, str]:
    """engines/ file of each graph for `onnxruntime-int8`, as its passed gate recorded them (CPU only)."""
    if device.type != "cpu":
        raise RuntimeUnavailable(f"the INT8 graphs run on the CPU only, not on {device}")
    files: dict[str, str] = read_gate(bundle, INT8_BACKEND, "onnxruntime")["graphs"]
    return files


class OnnxRuntimeBackend(GraphBackend):
    """Runs stage 1, stage 2 and LPIPS as ONNX Runtime sessions; tensors come back on `device`."""

    def __init__(self, graphs: dict[str, bytes], device: torch.device, threads: int | None = None,
                 name: str = "onnxruntime") -> None:
        self.name, self.device = name, device
        providers = providers_for(device)
        options = session_options(threads)
        self._sessions = {spec.name: ort.InferenceSession(graphs[spec.name], sess_options=options, providers=providers)
                          for spec in GRAPHS}

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device, threads: int | None = None,
                    int8: bool = False) -> OnnxRuntimeBackend:
        """Sessions from the bundle's verified graphs (refused when tampered with or stale); with `int8`, the
        graphs of the passed INT8 gate (refused when it failed or was never run)."""
        providers_for(device)
        files = int8_graph_files(bundle, device) if int8 else {s.name: artefact_name(s.name, "onnx") for s in GRAPHS}
        graphs = {spec.name: read_artefact(bundle, files[spec.name])[0] for spec in GRAPHS}
        return cls(graphs, device, threads, INT8_BACKEND if int8 else "onnxruntime")

    def _run(self, spec: GraphSpec, *tensors: Tensor) -> Tensor:
        (out,) = self._sessions[spec.name].run([spec.output], numpy_feed(spec, tensors))
        return torch.from_numpy(out).to(self.device)
