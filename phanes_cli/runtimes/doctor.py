"""`phanes doctor`: what this machine offers (OpenVINO among the runtimes) and which backend each stage of a
bundle would use, and why, with the export gate's verdict on the cheaper CPU backends.

Every probe is read-only and cheap (no model is built, no Ray session is started), so a user sees at
once why a run would be slow or refused.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.errors import PhanesError
from phanes_cli.infra.optional import available, missing_message
from phanes_cli.infra.versions import package_version
from phanes_cli.models.backbones import backbone_source
from phanes_cli.models.shipped_weights import shipped_path
from phanes_cli.runtimes import GATED_BACKENDS
from phanes_cli.runtimes.artefacts import ArtefactError, NotExported, artefact_name, read_artefact, read_provenance
from phanes_cli.runtimes.graphs import GRAPHS
from phanes_cli.runtimes.measured import cpu_identity, read_entries
from phanes_cli.runtimes.parity import verdict_line
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import CPU_BACKENDS, plan_backend
from phanes_cli.runtimes.tensorrt import tensorrt_unavailable

Report = list[tuple[str, str]]  # (topic, finding) lines in print order


def machine_report(lpips_weights: str | None = None) -> Report:
    """GPUs and compute capability, CUDA, TensorRT, ONNX Runtime providers, LPIPS weights."""
    rows: Report = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            rows.append(("gpu", f"cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}"))
    else:
        rows.append(("gpu", "none (torch sees no CUDA device)"))
    rows.append(("cuda", f"torch {torch.__version__} built with CUDA {torch.version.cuda or 'none (CPU-only build)'}"))
    trt_version = package_version("tensorrt")
    trt_reason = tensorrt_unavailable()
    unusable = f" (unusable: {trt_reason})" if trt_reason else ""
    rows.append(("tensorrt", f"{trt_version or 'not installed'}{unusable}"))
    if available("onnxruntime"):
        import onnxruntime as ort

        rows.append(("onnxruntime", f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}"))
    else:
        rows.append(("onnxruntime", f"not installed ({missing_message('onnxruntime', 'the ONNX backend')})"))
    rows.append(("openvino", _openvino_finding()))
    cores = len(os.sched_getaffinity(0))
    rows.append(("cpu", f"{cores} cores available, torch uses {torch.get_num_threads()} threads"))
    rows.append(("lpips trunk", f"AlexNet ImageNet weights, {backbone_source('alexnet', lpips_weights)}"))
    heads = shipped_path("lpips_heads")
    rows.append(("lpips heads", f"shipped with phanes: {heads}" if heads else "MISSING (reinstall phanes)"))
    return rows


def _openvino_finding() -> str:
    """OpenVINO's version and devices and whether the CPU computes bf16 natively (what `openvino-bf16` needs), or
    how to install it (importing it costs well under a second)."""
    if not available("openvino"):
        return f"not installed ({missing_message('openvino', 'the OpenVINO backend')})"
    import openvino as ov

    from phanes_cli.runtimes.openvino import native_bf16

    bf16 = "native (openvino-bf16 can run)" if native_bf16() else "none (openvino-bf16 cannot run)"
    return f"{package_version('openvino')}, devices: {', '.join(ov.Core().available_devices)}; CPU bf16: {bf16}"


def _gate_rows(bundle: Bundle) -> Report:
    """The export gate's verdict on each cheaper CPU backend of this bundle; a record phanes did not write (the
    provenance checks name its file and key) is one finding."""
    try:
        gates = read_provenance(bundle).get("gates", {})
    except NotExported:
        return []
    except ArtefactError as exc:
        return [("gate", f"refused: {exc}")]
    rows: Report = [("gate", verdict_line(name, gates[name]).removeprefix("gate ")) for name in GATED_BACKENDS
                    if name in gates]
    rows += [("gate", f"{name}: not gated (phanes export --cpu-backends {name})")
             for name in GATED_BACKENDS if name not in gates]
    return rows


def _host_port(address: str) -> tuple[str, int] | None:
    if address == "auto":
        current = Path("/tmp/ray/ray_current_cluster")
        address = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.is_file() else "")
        if not address:
            return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def ray_report(address: str | None, timeout: float = 2.0) -> Report:
    """Whether the Ray cluster at --address accepts a TCP connection (no session is started)."""
    if address is None:
        return [("ray", "no --address: `phanes screen` starts a private local Ray instance")]
    target = _host_port(address)
    if target is None:
        return [("ray", f"{address}: no running cluster found (set RAY_ADDRESS or pass host:port)")]
    try:
        with socket.create_connection(target, timeout=timeout):
            return [("ray", f"{address}: reachable at {target[0]}:{target[1]}")]
    except OSError as exc:
        return [("ray", f"{address}: NOT reachable at {target[0]}:{target[1]} ({exc.strerror or exc})")]


def bundle_report(folder: Path, device: torch.device, backend: str = "auto") -> Report:
    """Per stage: the state of its ONNX graph and TensorRT engine; then the backend `backend` resolves to, and why."""
    bundle = load_bundle(folder, require_calibration=False)
    calibrated = "calibrated" if bundle.calibration else "NOT calibrated"
    rows: Report = [("bundle", f"{folder} ({bundle.config.name}, {calibrated})")]
    try:
        precision = read_provenance(bundle).get("engine_precision")
    except ArtefactError:
        precision = None
    for graph in GRAPHS:
        states = []
        for fmt in ("onnx", "tensorrt"):
            if fmt == "tensorrt" and precision is None:
                states.append("tensorrt: no engine exported")
                continue
            try:
                read_artefact(bundle, artefact_name(graph.name, fmt, precision or "fp32"))
                states.append(f"{fmt}: ok")
            except ArtefactError as exc:
                states.append(f"{fmt}: {exc}")
        rows.append((f"stage {graph.name}", "; ".join(states)))
    rows += _gate_rows(bundle)
    plan = plan_backend(backend, bundle, device)
    for name, reason in plan.skipped.items():
        rows.append(("skipped", f"{name}: {reason}"))
    chosen = plan.chosen or "none: nothing can run this bundle here"
    if plan.chosen is None and plan.why.startswith("not measured"):
        chosen = "measured at first use"
    rows.append(("backend", f"every stage on {device}: {chosen} ({plan.why})"))
    if device.type == "cpu" and backend == "auto":
        rows += measured_rows(bundle)
    return rows


def _gate_word(name: str, gates: object) -> str:
    """A backend's export gate verdict in a word: passed, FAILED, not gated, or none needed (no gate applies)."""
    if name not in GATED_BACKENDS:
        return "none needed"
    verdict = gates.get(name) if isinstance(gates, dict) else None
    if not isinstance(verdict, dict):
        return "not gated"
    return "passed" if verdict.get("passed") is True else "FAILED"


def measured_rows(bundle: Bundle) -> Report:
    """The table `--backend auto` chooses by on this CPU (runtimes.measured): per thread count measured here,
    each backend's slices/s, its gate verdict and which one is chosen."""
    mine = [e for e in read_entries(bundle).values() if e.get("cpu") == cpu_identity()]
    if not mine:
        return [("measured", "nothing measured on this CPU yet: the first run with --backend auto measures the "
                             "usable CPU backends (a few seconds each); `phanes bench` fills it too")]
    try:
        gates = read_provenance(bundle).get("gates", {})
    except ArtefactError:
        gates = {}
    rows: Report = [("measured", f"this CPU: {cpu_identity()}")]
    for entry in sorted(mine, key=lambda e: str(e.get("threads"))):
        threads = entry.get("threads")
        chosen = plan_backend("auto", bundle, torch.device("cpu"), threads).chosen if isinstance(threads, int) else None
        rows.append(("measured", f"at {threads} thread(s), by {entry.get('source', '?')} {entry.get('measured', '')}"))
        rows.append(("measured", f"  {'backend':<17} {'slices/s':>9}  {'gate':<12} chosen"))
        speeds = entry.get("slices_per_s") if isinstance(entry.get("slices_per_s"), dict) else {}
        for name in sorted(CPU_BACKENDS, key=lambda n: -float(speeds.get(n, 0) or 0)):
            figure = speeds.get(name)
            shown = f"{figure:.1f}" if isinstance(figure, (int, float)) else "-"
            mark = "chosen" if name == chosen else ""
            rows.append(("measured", f"  {name:<17} {shown:>9}  {_gate_word(name, gates):<12} {mark}".rstrip()))
    return rows


def doctor(address: str | None = None, bundle: Path | None = None, device: str = "auto",
           lpips_weights: str | None = None) -> Report:
    """The full report; a bundle that cannot be loaded becomes a finding, not an abort."""
    rows = machine_report(lpips_weights) + ray_report(address)
    if bundle is not None:
        try:
            rows += bundle_report(bundle, select_device(device))
        except PhanesError as exc:
            rows.append(("bundle", f"refused: {exc}"))
    return rows
