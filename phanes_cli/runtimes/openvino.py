"""The OpenVINO backends: the bundle's exported ONNX graphs (the same bytes ONNX Runtime runs) compiled by
OpenVINO's CPU plugin, all in fp32 (`openvino`) or with the generator in bf16 (`openvino-bf16`).

fp32 is asked for explicitly, whatever the CPU offers (on bf16-capable CPUs OpenVINO would otherwise compute in
bf16: not what the export gate measured). `openvino-bf16` compiles only the stage 2 generator (BF16_GRAPHS, the
largest network) with bf16 inference precision, on CPUs with native bf16 arithmetic (AVX512-BF16, AMX):
measured on the shipped model, bf16 halves each network's time, but in stage 1 or LPIPS it moves the lesion
masks past the export gate (Dice 0.91 and 0.96 against fp32), in the generator it does not (0.98-0.99; docs/backends.md,
Backends and export). One stream, the latency hint, the thread count of the process and no core pinning (the
torch pre/post-processing and other actors share the cores).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch
from torch import Tensor

from phanes_cli.core.bundle import Bundle
from phanes_cli.runtimes import BF16_BACKEND
from phanes_cli.runtimes.artefacts import RuntimeUnavailable, artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS, STAGE2, GraphBackend, GraphSpec, numpy_feed

BF16_GRAPHS = (STAGE2.name,)


def compile_options(threads: int | None = None, precision: str = "f32") -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads()), "ENABLE_CPU_PINNING": "NO"}


def require_cpu(device: torch.device) -> None:
    """OpenVINO's CPU plugin is the one this backend uses; a CUDA device is refused, not silently ignored."""
    if device.type != "cpu":
        raise RuntimeUnavailable(f"the openvino backend runs on the CPU only, not on {device}")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO's CPU capabilities list BF16)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def require_bf16() -> None:
    """Without native bf16 OpenVINO would compute fp32 under the bf16 name: refused, `openvino` is that backend."""
    if not native_bf16():
        raise RuntimeUnavailable(f"{BF16_BACKEND} needs a CPU with native bf16 arithmetic (AVX512-BF16 or AMX); "
                                 "this one has none, use openvino")


class OpenVINOBackend(GraphBackend):
    """Runs stage 1, stage 2 and LPIPS as OpenVINO compiled models on the CPU, those in `bf16_graphs` in bf16."""

    def __init__(self, graphs: dict[str, bytes], device: torch.device, threads: int | None = None,
                 bf16_graphs: tuple[str, ...] = ()) -> None:
        require_cpu(device)
        if bf16_graphs:
            require_bf16()
        self.device = device
        self.name = BF16_BACKEND if bf16_graphs else "openvino"
        core = ov.Core()
        self._requests = {spec.name: core.compile_model(
            core.read_model(graphs[spec.name]), "CPU",
            compile_options(threads, "bf16" if spec.name in bf16_graphs else "f32")).create_infer_request()
            for spec in GRAPHS}

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device, threads: int | None = None,
                    bf16: bool = False) -> OpenVINOBackend:
        """Compiled models of the bundle's verified fp32 ONNX graphs (`bf16`: the `openvino-bf16` backend)."""
        require_cpu(device)
        graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
        return cls(graphs, device, threads, BF16_GRAPHS if bf16 else ())

    def _run(self, spec: GraphSpec, *tensors: Tensor) -> Tensor:
        result = self._requests[spec.name].infer(numpy_feed(spec, tensors), share_outputs=False)
        return torch.from_numpy(np.asarray(result[spec.output]))
