"""Accelerated inference runtimes: exported ONNX graphs run by ONNX Runtime (fp32, or with INT8 graphs) and
OpenVINO (fp32, or with the generator in bf16), TensorRT engines, and the choice between them and eager torch
(`select.choose_backend`).

The backend names live here, apart from the backends themselves, so the screening driver can check a
--backend value without importing the networks (lpips, torchvision: seconds of start-up per process).
"""

from __future__ import annotations

from phanes_cli.errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "tensorrt")
# The cheaper CPU backends: each runs only after passing the export gate on real brains (runtimes.parity.gate).
GATED_BACKENDS = ("onnxruntime-int8", "openvino", "openvino-bf16")
BF16_BACKEND = "openvino-bf16"  # OpenVINO with the generator in bf16 (runtimes.openvino)


def validate_backend_name(name: str) -> str:
    """A --backend value: auto or one of BACKENDS."""
    if name != "auto" and name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return name
