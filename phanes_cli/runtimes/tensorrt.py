"""TensorRT: engines built from the exported ONNX graphs, and the backend that runs them on a GPU.

Written against TensorRT's Python API (8.5+/10.x): `Builder`, `OnnxParser`, one optimisation profile over
the batch axis, a timing cache kept beside the engines, serialisation, and `IExecutionContext.execute_async_v3`
on torch's current CUDA stream with tensor addresses bound to torch CUDA tensors.

FP16: the layers whose intermediate values can exceed FP16's range (65504) stay FP32: reductions (the sums
of squared channel features in LPIPS' unit normalisation, the AOT gate's mean and standard deviation),
square roots and powers. Everything else may run in FP16.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from phanes_cli.core.bundle import Bundle
from phanes_cli.runtimes.artefacts import (
    ArtefactError,
    BatchProfile,
    EngineIncompatible,
    RuntimeUnavailable,
    artefact_name,
    read_artefact,
    read_provenance,
    reexport_hint,
)
from phanes_cli.runtimes.graphs import GRAPHS, LPIPS, STAGE1, STAGE2, GraphSpec

WORKSPACE_BYTES = 1 << 30
FP32_WHY = "reductions, square roots and powers can exceed FP16's range (65504)"


def tensorrt_unavailable(device: torch.device | None = None) -> str | None:
    """Why TensorRT cannot run here (None when it can): the package and a CUDA device are both needed."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if device is not None and device.type != "cuda":
        return f"device {device} is not a CUDA device"
    return None


def compute_capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _trt() -> Any:
    import tensorrt

    return tensorrt


def _keep_fp32_layers(network: Any, trt: Any) -> list[str]:
    """Pin overflow-prone layers to FP32 (see the module docstring); returns their names."""
    pinned = []
    unary_fp32 = {trt.UnaryOperation.SQRT}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        risky = layer.type == trt.LayerType.REDUCE
        risky |= layer.type == trt.LayerType.UNARY and layer.op in unary_fp32
        risky |= layer.type == trt.LayerType.ELEMENTWISE and layer.op == trt.ElementWiseOperation.POW
        if risky:
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned.append(layer.name)
    return pinned


def _parse(onnx_bytes: bytes, source: Path, builder: Any, logger: Any, trt: Any) -> Any:
    explicit_batch = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # the default (and deprecated) in 10
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else explicit_batch
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtefactError(f"{source}: TensorRT's ONNX parser rejected the graph: {errors}")
    return network, parser


def build_engine(onnx_bytes: bytes, source: Path, image_size: int, precision: str, profile: BatchProfile,
                 timing_cache: Path) -> tuple[bytes, dict[str, Any]]:
    """Serialised engine for one ONNX graph and its TensorRT provenance; the timing cache file is updated."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(onnx_bytes, source, builder, logger, trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        opt_profile.set_shape(name, *[(b, 1, image_size, image_size) for b in (profile.min, profile.opt, profile.max)])
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    pinned: list[str] = []
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _keep_fp32_layers(network, trt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtefactError(f"{source}: TensorRT could not build an engine (see the TensorRT log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    device = torch.device("cuda", torch.cuda.current_device())
    info = {"tensorrt": trt.__version__, "compute_capability": compute_capability(device),
            "gpu": torch.cuda.get_device_name(device), "fp32_layers": pinned,
            "fp32_layers_why": FP32_WHY if pinned else None}
    return bytes(serialized), info


class _Engine:
    """One deserialised engine and its execution context; runs batches within the profile's max batch."""

    def __init__(self, data: bytes, spec: GraphSpec, max_batch: int, trt: Any) -> None:
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineIncompatible(f"TensorRT {trt.__version__} cannot deserialise the {spec.name} engine; "
                                     "re-export on this machine")
        self.context = self.engine.create_execution_context()
        self.spec, self.max_batch = spec, max_batch

    def __call__(self, *tensors: Tensor) -> Tensor:
        starts = range(0, tensors[0].shape[0], self.max_batch)
        parts = [self._run([t[i:i + self.max_batch] for t in tensors]) for i in starts]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _run(self, tensors: list[Tensor]) -> Tensor:
        inputs = [t.to(torch.float32).contiguous() for t in tensors]
        for name, t in zip(self.spec.inputs, inputs, strict=True):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.spec.output))
        out = torch.empty(shape, device=inputs[0].device, dtype=torch.float32)
        self.context.set_tensor_address(self.spec.output, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(inputs[0].device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {self.spec.name} engine")
        return out


class TensorRTBackend:
    """Runs the bundle's TensorRT engines; refuses (EngineIncompatible) engines built for another TensorRT or GPU."""

    name = "tensorrt"

    def __init__(self, engines: dict[str, bytes], device: torch.device, max_batch: int) -> None:
        reason = tensorrt_unavailable(device)
        if reason is not None:
            raise RuntimeUnavailable(f"TensorRT backend unavailable: {reason}")
        self.device = device
        self._engines = {spec.name: _Engine(engines[spec.name], spec, max_batch, _trt()) for spec in GRAPHS}

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device) -> TensorRTBackend:
        """Engines from the bundle, refused when tampered with, stale, or built for another TensorRT or GPU."""
        reason = tensorrt_unavailable(device)
        if reason is not None:
            raise RuntimeUnavailable(f"TensorRT backend unavailable: {reason}")
        precision = read_provenance(bundle).get("engine_precision", "fp32")
        here = (_trt().__version__, compute_capability(device))
        engines, max_batch = {}, 1
        for spec in GRAPHS:
            name = artefact_name(spec.name, "tensorrt", precision)
            data, entry = read_artefact(bundle, name)
            built = (entry.get("tensorrt"), entry.get("compute_capability"))
            if built != here:
                raise EngineIncompatible(f"{bundle.path / 'engines' / name}: built for TensorRT {built[0]} on compute "
                                         f"capability {built[1]}, this machine has TensorRT {here[0]} on {here[1]}; "
                                         f"re-export on this machine")
            engines[spec.name], max_batch = data, max_batch_of(entry, bundle.path / "engines" / name)
        try:
            return cls(engines, device, max_batch)
        except EngineIncompatible as exc:
            raise EngineIncompatible(f"{bundle.path / 'engines'}: {exc}") from exc

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._engines[STAGE1.name](x.to(self.device))

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self._engines[STAGE2.name](masked.to(self.device), mask.to(self.device))

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self._engines[LPIPS.name](a.to(self.device), b.to(self.device))


def max_batch_of(entry: dict[str, Any], path: Path) -> int:
    """The largest batch an engine was built for, from its provenance entry; ArtefactError when not a count."""
    profile = entry.get("batch_profile")
    value = profile.get("max") if isinstance(profile, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtefactError(f"{path}: its provenance holds no valid batch profile; {reexport_hint(path.parent.parent)}")
    return value
