"""Which backend runs a bundle's networks on this machine, and why (`phanes doctor` prints the same plan).

`auto` tries, in order: the TensorRT engines, ONNX Runtime on CUDA, torch on CUDA; on the CPU the backends
`phanes bench` measured for this bundle (engines/bench.json), fastest first, then the others in CPU_ORDER
(this project's measured order). The INT8 and OpenVINO backends run only when they passed their export
gate (`openvino-bf16` also needs a CPU with native bf16). A refused artefact (tampered, stale, built for
another TensorRT or GPU, a failed gate) makes `auto` fall back to the next candidate with a warning; an
explicitly named backend is strict.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.infra.optional import available, missing_message
from phanes_cli.runtimes import validate_backend_name
from phanes_cli.runtimes.artefacts import (
    ArtefactError,
    GateRefused,
    NotExported,
    RuntimeUnavailable,
    artefact_name,
    read_artefact,
    read_bench,
    read_gate,
    read_provenance,
)
from phanes_cli.runtimes.graphs import GRAPHS
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.tensorrt import TensorRTBackend, tensorrt_unavailable


class BackendFallbackWarning(RuntimeWarning):
    """`auto` skipped a backend whose artefacts were refused; the message says which file and why."""


@dataclass
class BackendPlan:
    """The candidates in order, why each unusable one was skipped, and the chosen one (None: nothing usable)."""

    candidates: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    chosen: str | None = None
    why: str = ""


# Fastest first, as benchmarks/cpu_backends.py measured them on the cpu config (README: Backends and export): the
# INT8 generator was fastest in every run; OpenVINO and fp32 ONNX Runtime swapped places between runs; OpenVINO
# with a bf16 generator beat fp32 OpenVINO (its generator at half the time) where the CPU has native bf16.
CPU_ORDER = ("onnxruntime-int8", "openvino-bf16", "openvino", "onnxruntime", "torch")


def _cpu_order(bundle: Bundle) -> tuple[list[str], str]:
    cpu = (read_bench(bundle) or {}).get("cpu")
    results = cpu.get("results") if isinstance(cpu, dict) else None
    speed = {name: r["slices_per_s"] for name, r in (results if isinstance(results, dict) else {}).items()
             if name in CPU_ORDER and isinstance(r, dict) and isinstance(r.get("slices_per_s"), (int, float))}
    if speed:
        measured = sorted(speed, key=lambda name: -speed[name])
        order = [*measured, *(b for b in CPU_ORDER if b not in speed)]
        return order, f"phanes bench measured {measured[0]} fastest on the CPU for this bundle"
    return list(CPU_ORDER), f"no CPU benchmark recorded: the project's measured order ({', '.join(CPU_ORDER)})"


def candidates(name: str, bundle: Bundle, device: torch.device) -> tuple[list[str], str]:
    """Backends to try for `name` on `device`, best first, and the rule that ordered them."""
    if validate_backend_name(name) != "auto":
        return [name], f"--backend {name}"
    if device.type == "cuda":
        return ["tensorrt", "onnxruntime", "torch"], "on CUDA: TensorRT engines, then ONNX Runtime CUDA, then torch"
    return _cpu_order(bundle)


def check_backend(backend: str, bundle: Bundle, device: torch.device) -> None:
    """Raise ArtefactError when `backend` cannot run this bundle on `device`, checking every artefact it needs."""
    if backend == "tensorrt":
        reason = tensorrt_unavailable(device)
        if reason is not None:
            raise RuntimeUnavailable(reason)
        precision = read_provenance(bundle).get("engine_precision")
        if precision is None:
            raise NotExported("no TensorRT engines exported (run `phanes export --format tensorrt` on a GPU machine)")
        for graph in GRAPHS:
            read_artefact(bundle, artefact_name(graph.name, "tensorrt", precision))
    elif backend in ("onnxruntime", "onnxruntime-int8"):
        _check_onnxruntime(backend, bundle, device)
    elif backend in ("openvino", "openvino-bf16"):
        _check_openvino(backend, bundle, device)


def _check_onnxruntime(backend: str, bundle: Bundle, device: torch.device) -> None:
    if not available("onnxruntime"):
        raise RuntimeUnavailable(missing_message("onnxruntime", "the ONNX Runtime backend"))
    from phanes_cli.runtimes.onnx import int8_graph_files, providers_for  # [onnx] extra: imported when installed

    providers_for(device)
    files = int8_graph_files(bundle, device) if backend == "onnxruntime-int8" else {}
    for graph in GRAPHS:
        read_artefact(bundle, files.get(graph.name, artefact_name(graph.name, "onnx")))


def _check_openvino(backend: str, bundle: Bundle, device: torch.device) -> None:
    if not available("openvino"):
        raise RuntimeUnavailable(missing_message("openvino", "the OpenVINO backend"))
    if device.type != "cpu":
        raise RuntimeUnavailable(f"the {backend} backend runs on the CPU only, not on {device}")
    if backend == "openvino-bf16":
        from phanes_cli.runtimes.openvino import require_bf16  # imports openvino, checked installed

        require_bf16()
    read_gate(bundle, backend, "openvino")
    for graph in GRAPHS:
        read_artefact(bundle, artefact_name(graph.name, "onnx"))


def unusable_reason(backend: str, bundle: Bundle, device: torch.device) -> str | None:
    """Why `backend` cannot run this bundle on `device`, or None when it can."""
    try:
        check_backend(backend, bundle, device)
    except ArtefactError as exc:
        return str(exc)
    return None


def plan_backend(name: str, bundle: Bundle, device: torch.device) -> BackendPlan:
    """The backend `choose_backend` would build, without building it."""
    order, rule = candidates(name, bundle, device)
    plan = BackendPlan(candidates=order, why=rule)
    for backend in order:
        reason = unusable_reason(backend, bundle, device)
        if reason is None:
            plan.chosen = backend
            return plan
        plan.skipped[backend] = reason
    return plan


def build_backend(name: str, bundle: Bundle, device: torch.device, lpips_weights: str | None = None) -> Backend:
    """Construct one named backend (no fallback)."""
    if name == "tensorrt":
        return TensorRTBackend.from_bundle(bundle, device)
    if name in ("onnxruntime", "onnxruntime-int8"):
        from phanes_cli.runtimes.onnx import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_bundle(bundle, device, int8=name == "onnxruntime-int8")
    if name in ("openvino", "openvino-bf16"):
        from phanes_cli.runtimes.openvino import OpenVINOBackend  # the [openvino] extra, checked installed

        return OpenVINOBackend.from_bundle(bundle, device, bf16=name == "openvino-bf16")
    return TorchBackend(load_networks(bundle, lpips_weights), device)


def _fallback_message(backend: str, exc: ArtefactError, bundle: Bundle) -> str:
    """The line `auto` prints for a refused backend: a failed gate (a verdict of the export, shown on every run of
    the bundle) by its headline figure, the rest by `phanes doctor`; anything else (tampered, stale, foreign) whole."""
    if isinstance(exc, GateRefused):
        return (f"backend {backend} skipped: it failed its export gate ({exc.headline()}); "
                f"`phanes doctor --bundle {bundle.path}` shows its figures")
    return f"backend {backend} refused ({exc}); falling back to the next one"


def choose_backend(name: str, bundle: Bundle, device: torch.device, lpips_weights: str | None = None) -> Backend:
    """The backend to run `bundle` on `device`: `name` itself, or for `auto` the best usable candidate.

    Under `auto`, a refused artefact is reported as a BackendFallbackWarning naming the file and the reason;
    a backend that is simply absent here (not exported, runtime not installed) is skipped silently.
    """
    order, _ = candidates(name, bundle, device)
    errors: list[str] = []
    for backend in order:
        try:
            check_backend(backend, bundle, device)
            return build_backend(backend, bundle, device, lpips_weights)
        except ArtefactError as exc:
            if name != "auto":
                raise type(exc)(f"backend {backend} refused: {exc}") from exc
            errors.append(f"{backend}: {exc}")
            if not isinstance(exc, (NotExported, RuntimeUnavailable)):
                warnings.warn(_fallback_message(backend, exc, bundle), BackendFallbackWarning, stacklevel=2)
    raise ArtefactError("no backend can run this bundle: " + "; ".join(errors))
