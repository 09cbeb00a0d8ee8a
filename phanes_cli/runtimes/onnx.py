"""The ONNX Runtime backend: the exported graphs of a bundle on the CPU or CUDA execution provider.

Sessions are built from the verified bytes of each graph (never re-read from disk after the check), with
every graph optimisation on and the intra-op thread count of the process, so a run uses what torch would.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from phanes_cli.core.bundle import Bundle
from phanes_cli.runtimes.artefacts import RuntimeUnavailable, artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS, LPIPS, STAGE1, STAGE2, GraphSpec

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


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
    # cores that the torch pre/post-processing between the graphs needs (measured in README: Backends)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend:
    """Runs stage 1, stage 2 and LPIPS as ONNX Runtime sessions; tensors come back on `device`."""

    name = "onnxruntime"

    def __init__(self, graphs: dict[str, bytes], device: torch.device, threads: int | None = None) -> None:
        self.device = device
        providers = providers_for(device)
        options = session_options(threads)
        self._sessions = {spec.name: ort.InferenceSession(graphs[spec.name], sess_options=options, providers=providers)
                          for spec in GRAPHS}

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device, threads: int | None = None) -> OnnxRuntimeBackend:
        """Sessions from the bundle's verified graphs (refused when tampered with or stale)."""
        providers_for(device)
        graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
        return cls(graphs, device, threads)

    def _run(self, spec: GraphSpec, *tensors: Tensor) -> Tensor:
        feed = {name: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
                for name, t in zip(spec.inputs, tensors, strict=True)}
        (out,) = self._sessions[spec.name].run([spec.output], feed)
        return torch.from_numpy(out).to(self.device)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._run(STAGE1, x)

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self._run(STAGE2, masked, mask)

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self._run(LPIPS, a, b)
