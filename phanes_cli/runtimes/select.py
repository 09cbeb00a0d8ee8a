"""Which backend runs a bundle's networks on this machine, and why (`phanes doctor` prints the same plan).

`auto` on a GPU tries, in order: the TensorRT engines, ONNX Runtime on CUDA, torch on CUDA. On the CPU it takes
the fastest of the usable backends as measured on this CPU at this thread count (`runtimes.measured`: at the
bundle's first use here, then cached), and says so in one line. The INT8 and OpenVINO backends are usable only
when they passed their export gate (`openvino-bf16` also needs a CPU with native bf16). Under `auto`, a backend
that is absent here (not exported, runtime not installed) or failed its export gate is skipped quietly: that
is a verdict of the export, recorded with the run and shown by `phanes doctor`, not something to act on. A
refused artefact (tampered, stale, built for another TensorRT or GPU or runtime version) is a
BackendFallbackWarning. An explicitly named backend is strict: any refusal is an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
    read_gate,
    read_provenance,
)
from phanes_cli.runtimes.graphs import GRAPHS
from phanes_cli.runtimes.measured import Speeds, cached_speeds, measure_here
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.tensorrt import TensorRTBackend, tensorrt_unavailable


class BackendFallbackWarning(RuntimeWarning):
    """`auto` skipped a backend whose artefacts were refused; the message says which file and why."""


# Every backend that runs on the CPU; `auto` measures the usable ones (listed here in no order of preference).
CPU_BACKENDS = ("onnxruntime-int8", "openvino-bf16", "openvino", "onnxruntime", "torch")
CUDA_ORDER = ("tensorrt", "onnxruntime", "torch")
# Under `auto`: a backend not exported or not installed here, or one that failed its export gate, is recorded,
# not warned about (module docstring).
QUIET_SKIPS = (NotExported, RuntimeUnavailable, GateRefused)


@dataclass
class BackendPlan:
    """The candidates, why each unusable one was skipped, and the chosen one with the line that says why (None:
    nothing usable, or on the CPU not measured here yet: `why` says which)."""

    candidates: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    chosen: str | None = None
    why: str = ""


@dataclass
class BackendChoice:
    """The backend built, one line saying what was chosen and why, every candidate skipped with its reason (for
    the run record and `phanes doctor`), and the refusals a user should act on (warnings)."""

    backend: Backend
    why: str
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def candidates(name: str, bundle: Bundle, device: torch.device) -> tuple[list[str], str]:
    """Backends to try for `name` on `device` and the rule that chooses among them."""
    if validate_backend_name(name) != "auto":
        return [name], "named by --backend"
    if device.type == "cuda":
        return list(CUDA_ORDER), "on CUDA: TensorRT engines, then ONNX Runtime CUDA, then torch"
    return list(CPU_BACKENDS), "the fastest usable backend as measured on this CPU"


def speed_line(chosen: str, speeds: Speeds, threads: int) -> str:
    """The one line `auto` prints on the CPU, e.g. 'backend openvino: 38.0 slices/s measured here (1 thread), torch
    17.5' (the same in every actor of a node, whichever of them measured)."""
    others = ", ".join(f"{name} {speeds.slices_per_s[name]:.1f}" for name in speeds.ranked() if name != chosen)
    return (f"backend {chosen}: {speeds.slices_per_s[chosen]:.1f} slices/s measured here "
            f"({threads} thread{'s' if threads > 1 else ''})" + (f", {others}" if others else ""))


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


def _usable(order: list[str], bundle: Bundle, device: torch.device) -> tuple[list[str], dict[str, str], list[str]]:
    """(the candidates that can run here, why each other one cannot, the warnings among those reasons)."""
    usable: list[str] = []
    skipped: dict[str, str] = {}
    warned: list[str] = []
    for backend in order:
        try:
            check_backend(backend, bundle, device)
            usable.append(backend)
        except ArtefactError as exc:
            skipped[backend] = str(exc)
            if not isinstance(exc, QUIET_SKIPS):
                warned.append(f"backend {backend} refused ({exc}); falling back to the next one")
    return usable, skipped, warned


def plan_backend(name: str, bundle: Bundle, device: torch.device, threads: int | None = None) -> BackendPlan:
    """The backend `choose` would build at `threads` threads (default: this process's), without building or
    measuring anything: on the CPU under `auto`, from the figures cached here."""
    order, rule = candidates(name, bundle, device)
    usable, skipped, _ = _usable(order, bundle, device)
    plan = BackendPlan(candidates=order, skipped=skipped, why=rule)
    if name != "auto" or device.type == "cuda" or len(usable) < 2:
        plan.chosen = usable[0] if usable else None
        plan.why = rule if name != "auto" or device.type == "cuda" else "the only backend usable on this CPU"
        return plan
    threads = threads or torch.get_num_threads()
    speeds = cached_speeds(bundle, usable, threads)
    ranked = speeds.ranked() if speeds is not None else []
    if speeds is None or not ranked:
        plan.why = (f"not measured on this CPU at {threads} thread(s) yet: the first run with --backend auto "
                    f"measures {', '.join(usable)}")
        return plan
    plan.chosen, plan.why = ranked[0], speed_line(ranked[0], speeds, threads)
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


def choose(name: str, bundle: Bundle, device: torch.device, lpips_weights: str | None = None) -> BackendChoice:
    """The backend to run `bundle` on `device`, `name` itself or for `auto` the best usable candidate, with the
    line that says why (module docstring). On the CPU the first use of a bundle here measures the usable
    backends (a few seconds each) and caches the figures."""
    order, rule = candidates(name, bundle, device)
    if name != "auto":
        try:
            check_backend(name, bundle, device)
        except ArtefactError as exc:
            raise type(exc)(f"backend {name} refused: {exc}") from exc
        return BackendChoice(build_backend(name, bundle, device, lpips_weights), f"backend {name}: {rule}")
    usable, skipped, warned = _usable(order, bundle, device)
    if device.type == "cpu" and len(usable) > 1:
        speeds, built = measure_here(bundle, usable, lambda b: build_backend(b, bundle, device, lpips_weights))
        for backend, reason in speeds.failed.items():
            skipped[backend] = reason
            warned.append(f"backend {backend} could not run here ({reason}); falling back to the next one")
        ranked = speeds.ranked()
        if ranked:
            chosen = built.get(ranked[0]) or build_backend(ranked[0], bundle, device, lpips_weights)
            return BackendChoice(chosen, speed_line(ranked[0], speeds, torch.get_num_threads()), skipped, warned)
    for backend in usable:
        try:
            built_one = build_backend(backend, bundle, device, lpips_weights)
        except ArtefactError as exc:
            skipped[backend] = str(exc)
            warned.append(f"backend {backend} refused ({exc}); falling back to the next one")
            continue
        why = rule if device.type == "cuda" else "the only backend usable on this CPU"
        return BackendChoice(built_one, f"backend {backend}: {why}", skipped, warned)
    raise ArtefactError("no backend can run this bundle: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()))


def cpu_speed(name: str, bundle: Bundle, threads: int, lpips_weights: str | None = None,
              announce: Callable[[str], object] = lambda line: None) -> float:
    """Slices/s on this CPU at `threads` threads of the backend `name` (auto: the fastest usable one), from the
    figures cached here or measured now and cached (`measured.measure_here`); 0 when none can run. What the
    screening plan weighs one- against two-thread actors by."""
    device = torch.device("cpu")
    order, _ = candidates(name, bundle, device)
    usable, _, _ = _usable(order, bundle, device)
    if not usable:
        return 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # sessions take the thread count they are built with, as in an actor
    try:
        speeds, _ = measure_here(bundle, usable, lambda b: build_backend(b, bundle, device, lpips_weights), announce)
    finally:
        torch.set_num_threads(before)
    return max(speeds.slices_per_s.values(), default=0.0)


def choose_backend(name: str, bundle: Bundle, device: torch.device, lpips_weights: str | None = None) -> Backend:
    """`choose`'s backend; the refusals a user should act on become BackendFallbackWarnings."""
    choice = choose(name, bundle, device, lpips_weights)
    for message in choice.warnings:
        warnings.warn(message, BackendFallbackWarning, stacklevel=2)
    return choice.backend
