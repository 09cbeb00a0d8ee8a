"""The OpenVINO backend: the bundle's exported ONNX graphs (the same bytes ONNX Runtime runs) compiled by
OpenVINO's CPU plugin.

Compiled with fp32 inference precision, whatever the CPU offers (on bf16-capable CPUs OpenVINO would
otherwise compute in bf16: not what the export gate measured), one stream, the latency hint, the thread
count of the process and no core pinning (the torch pre/post-processing and other actors share the cores).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch
from torch import Tensor

from phanes_cli.core.bundle import Bundle
from phanes_cli.runtimes.artefacts import RuntimeUnavailable, artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS, GraphBackend, GraphSpec, numpy_feed


def compile_options(threads: int | None = None) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads()), "ENABLE_CPU_PINNING": "NO"}


def require_cpu(device: torch.device) -> None:
    """OpenVINO's CPU plugin is the one this backend uses; a CUDA device is refused, not silently ignored."""
    if device.type != "cpu":
        raise RuntimeUnavailable(f"the openvino backend runs on the CPU only, not on {device}")


class OpenVINOBackend(GraphBackend):
    """Runs stage 1, stage 2 and LPIPS as OpenVINO compiled models on the CPU."""

    name = "openvino"

    def __init__(self, graphs: dict[str, bytes], device: torch.device, threads: int | None = None) -> None:
        require_cpu(device)
        self.device = device
        core = ov.Core()
        options = compile_options(threads)
        self._requests = {spec.name: core.compile_model(core.read_model(graphs[spec.name]), "CPU", options)
                          .create_infer_request() for spec in GRAPHS}

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device, threads: int | None = None) -> OpenVINOBackend:
        """Compiled models of the bundle's verified fp32 ONNX graphs."""
        require_cpu(device)
        graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
        return cls(graphs, device, threads)

    def _run(self, spec: GraphSpec, *tensors: Tensor) -> Tensor:
        result = self._requests[spec.name].infer(numpy_feed(spec, tensors), share_outputs=False)
        return torch.from_numpy(np.asarray(result[spec.output]))
