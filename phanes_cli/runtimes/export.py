"""`phanes export`: the bundle's three inference graphs as ONNX (and TensorRT engines on a GPU), checked at once.

The graphs are traced with torch's TorchScript-based ONNX exporter (`dynamo=False`: the torch.export-based
exporter needs onnxscript, which this project does not depend on) at opset 17 with a dynamic batch axis.
Before anything is written, each graph is checked against TensorRT's ONNX parser operator list and run by
ONNX Runtime next to eager torch through the whole pipeline, on random and on real brain slices; a
difference beyond PARITY_ATOL refuses the export. Artefacts, their provenance and the re-sealed bundle
index are written last, atomically, so a failed export leaves the bundle as it was.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, load_bundle, seal_index
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import run_slices, stage1_map
from phanes_cli.errors import ConfigError
from phanes_cli.infra.atomic import atomic_path, write_json
from phanes_cli.infra.versions import package_version
from phanes_cli.runtimes.artefacts import (
    GRAPH_WEIGHTS,
    PRECISIONS,
    PROVENANCE_FILE,
    ArtefactError,
    BatchProfile,
    NotExported,
    RuntimeUnavailable,
    artefact_name,
    engines_dir,
    read_provenance,
    sha256_bytes,
)
from phanes_cli.runtimes.graphs import GRAPHS, GraphSpec, graph_modules
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.samples import brain_slices, random_slices
from phanes_cli.runtimes.tensorrt import TensorRTBackend, build_engine, tensorrt_unavailable
from phanes_cli.runtimes.trt_operators import SOURCE as TRT_OPS_SOURCE
from phanes_cli.runtimes.trt_operators import unsupported_nodes

OPSET = 17
EXPORTER = "torch.onnx.export, TorchScript tracer (dynamo=False)"
FORMATS = ("onnx", "tensorrt", "all")
# Max |runtime - torch| allowed through the whole pipeline (maps in [0, 1] for x_cph and x_ph; s(x) is smaller).
PARITY_ATOL: dict[str, dict[str, float]] = {
    "fp32": {"x_cph": 1e-4, "x_ph": 1e-4, "anomaly": 1e-4},
    "fp16": {"x_cph": 2e-2, "x_ph": 2e-2, "anomaly": 2e-2},
}
# Voxel agreement of the lesion masks (s >= calibrated threshold). The dilated inpainting mask's agreement is
# recorded too but not gated: dilation turns one pixel flipped at the threshold into a blob.
MIN_LESION_AGREEMENT = 0.999
PARITY_SLICES = {"random": 4, "brain": 8}


@dataclass
class ExportReport:
    """What an export wrote and measured; `notes` say what was skipped and why."""

    written: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bundle_hash: str = ""


def to_onnx(module: torch.nn.Module, spec: GraphSpec, image_size: int) -> bytes:
    """Trace one graph to ONNX bytes with a dynamic batch axis on every input and the output."""
    example = tuple(torch.rand(2, 1, image_size, image_size) for _ in spec.inputs)
    axes = {name: {0: "batch"} for name in (*spec.inputs, spec.output)}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notices
        path = Path(tmp) / f"{spec.name}.onnx"
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=OPSET, input_names=list(spec.inputs),
                          output_names=[spec.output], dynamic_axes=axes, do_constant_folding=True)
        data = path.read_bytes()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    problems = unsupported_nodes(model)
    if problems:
        raise ArtefactError(f"{spec.name} graph would not parse in TensorRT ({TRT_OPS_SOURCE}): {'; '.join(problems)}")
    return data


def _state_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _index_files(bundle: Bundle) -> dict[str, str]:
    files: dict[str, str] = json.loads((bundle.path / "bundle.json").read_text())["files"]
    return files


def reference_mask_threshold(bundle: Bundle, reference: Backend, x: torch.Tensor, brain: torch.Tensor) -> float:
    """The bundle's mask threshold, or (uncalibrated) about the 95th percentile of torch's own m(x) on these slices."""
    if bundle.calibration is not None:
        return bundle.calibration.mask_threshold
    m = stage1_map(x, reference.reconstruct(x), brain, reference, bundle.config.mask)
    values = m[brain > 0].sort().values
    k = min(int(0.95 * values.numel()), values.numel() - 2)
    return float(values[k] + values[k + 1]) / 2  # between two values: no pixel sits on the threshold itself


def parity(bundle: Bundle, candidate: Backend, reference: Backend, precision: str = "fp32") -> dict[str, Any]:
    """Max abs differences (candidate vs torch) of x_cph, x_ph and s(x), and mask agreements, per slice set.

    x_ph and s(x) are compared with the reference's inpainting mask given to both, so a threshold flip on one
    pixel does not hide a network difference; the candidate's own masks are scored as voxel agreement.
    Raises ArtefactError when a difference or the lesion agreement is outside PARITY_ATOL / MIN_LESION_AGREEMENT.
    """
    cfg, tolerance, results = bundle.config, PARITY_ATOL[precision], {}
    for label, n in PARITY_SLICES.items():
        x, brain = (random_slices(cfg.preprocess, n) if label == "random" else brain_slices(cfg.preprocess, n))
        x, brain = x.to(reference.device), brain.to(reference.device)
        level = reference_mask_threshold(bundle, reference, x, brain)
        ref = run_slices(x, brain, reference, cfg, level)
        same_mask = run_slices(x, brain, candidate, cfg, level, given_mask=ref.inpaint_mask)
        own = run_slices(x, brain, candidate, cfg, level)
        row: dict[str, float] = {key: float((getattr(same_mask, key).to(ref.x.device) - getattr(ref, key)).abs().max())
                                 for key in ("x_cph", "x_ph", "anomaly")}
        row["mask_agreement"] = float((own.inpaint_mask.to(ref.x.device) == ref.inpaint_mask).float().mean())
        if bundle.calibration is not None:
            rule, inside = LesionRule.from_calibration(bundle.calibration), brain.cpu().numpy()
            own_lesions = rule.candidates(own.anomaly.float().cpu().numpy(), inside)
            row["lesion_agreement"] = float((own_lesions == rule.candidates(ref.anomaly.cpu().numpy(), inside)).mean())
        results[label] = row
        bad = [f"{k} {row[k]:.2e} > {tolerance[k]:.0e}" for k in tolerance if row[k] > tolerance[k]]
        if row.get("lesion_agreement", 1.0) < MIN_LESION_AGREEMENT:
            bad.append(f"lesion mask agreement {row['lesion_agreement']:.4%} < {MIN_LESION_AGREEMENT:.1%}")
        if bad:
            raise ArtefactError(f"{candidate.name} disagrees with torch on {label} slices: {', '.join(bad)}; "
                                "nothing was written")
    return {"tolerance": tolerance, "min_lesion_agreement": MIN_LESION_AGREEMENT, **results}


def _previous_entries(bundle: Bundle, keep_format: str) -> dict[str, Any]:
    """Artefact entries of an earlier export in the format this run does not rebuild (kept, checked on use)."""
    try:
        previous = read_provenance(bundle)
    except NotExported:
        return {}
    except ArtefactError:
        return {}  # a tampered provenance is replaced, not trusted
    return {name: entry for name, entry in previous.get("artefacts", {}).items() if entry.get("format") == keep_format}


def _onnx_artefacts(bundle: Bundle, nets: torch.nn.Module,
                    report: ExportReport) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Export, operator-check and parity-check the ONNX graphs in memory."""
    modules = graph_modules(nets)  # type: ignore[arg-type]
    graphs = {spec.name: to_onnx(modules[spec.name], spec, bundle.config.preprocess.image_size) for spec in GRAPHS}
    cpu = torch.device("cpu")
    report.parity["onnxruntime"] = parity(bundle, OnnxRuntimeBackend(graphs, cpu), TorchBackend(nets, cpu))  # type: ignore[arg-type]
    return graphs, {artefact_name(name, "onnx"): {"graph": name, "format": "onnx", "precision": "fp32", "opset": OPSET}
                    for name in graphs}


def _engine_artefacts(bundle: Bundle, graphs: dict[str, bytes], nets: torch.nn.Module, precision: str,
                      profile: BatchProfile, report: ExportReport) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Build, then parity-check on the GPU, one TensorRT engine per graph."""
    device = torch.device("cuda", torch.cuda.current_device())
    cache = engines_dir(bundle.path) / "timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    engines, entries = {}, {}
    for spec in GRAPHS:
        data, info = build_engine(graphs[spec.name], bundle.path / artefact_name(spec.name, "onnx"),
                                  bundle.config.preprocess.image_size, precision, profile, cache)
        engines[spec.name] = data
        entries[artefact_name(spec.name, "tensorrt", precision)] = {"graph": spec.name, "format": "tensorrt",
                                                                   "precision": precision, "opset": OPSET, **info}
    reference = TorchBackend(nets, device, autocast=False)  # type: ignore[arg-type]
    report.parity["tensorrt"] = parity(bundle, TensorRTBackend(engines, device, profile.max), reference, precision)
    return engines, entries


def export_bundle(folder: str | Path, fmt: str = "onnx", precision: str = "fp32", profile: BatchProfile | None = None,
                  lpips_weights: str | None = None) -> ExportReport:
    """Export a bundle's graphs (and engines where TensorRT and a GPU are present) into BUNDLE/engines/."""
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)} and --precision one of "
                          f"{', '.join(PRECISIONS)}")
    profile = (profile or BatchProfile()).validate()
    bundle = load_bundle(folder, require_calibration=False)
    nets = load_networks(bundle, lpips_weights).eval()
    report = ExportReport()
    trt_missing = tensorrt_unavailable() if fmt in ("tensorrt", "all") else None
    if fmt == "tensorrt" and trt_missing:
        raise RuntimeUnavailable(f"cannot build TensorRT engines here: {trt_missing}")
    graphs, entries = _onnx_artefacts(bundle, nets, report)
    blobs = {artefact_name(name, "onnx"): data for name, data in graphs.items()}
    if fmt != "onnx" and trt_missing is None:
        engines, engine_entries = _engine_artefacts(bundle, graphs, nets, precision, profile, report)
        blobs.update({artefact_name(name, "tensorrt", precision): data for name, data in engines.items()})
        entries.update(engine_entries)
    else:
        entries.update(_previous_entries(bundle, "tensorrt"))
        if trt_missing:
            report.notes.append(f"TensorRT engines not built: {trt_missing}")
    report.bundle_hash = _write_artefacts(bundle, nets, blobs, entries, profile, report)
    report.written = sorted(blobs)
    return report


def _write_artefacts(bundle: Bundle, nets: torch.nn.Module, blobs: dict[str, bytes], entries: dict[str, Any],
                     profile: BatchProfile, report: ExportReport) -> str:
    """Write the artefacts and their provenance atomically, then re-seal the bundle index; returns its hash."""
    index = _index_files(bundle)
    lpips_sha = _state_sha256(nets.lpips)  # type: ignore[arg-type]
    for name, data in blobs.items():
        with atomic_path(engines_dir(bundle.path) / name) as tmp:
            tmp.write_bytes(data)
        entries[name]["sha256"] = sha256_bytes(data)
    for entry in entries.values():
        weights = GRAPH_WEIGHTS.get(entry["graph"])
        entry.setdefault("source_sha256", index[weights] if weights else lpips_sha)
        entry.setdefault("batch_profile", vars(profile))
    engine_precision = next((e["precision"] for e in entries.values() if e["format"] == "tensorrt"), None)
    provenance = {"format": 1, "exporter": EXPORTER, "opset": OPSET, "exported": datetime.now(timezone.utc).isoformat(),
                  "versions": {p: package_version(p) for p in ("torch", "onnx", "onnxruntime", "tensorrt")},
                  "weights": {**{w: index[w] for w in GRAPH_WEIGHTS.values()}, "lpips": lpips_sha},
                  "tensorrt_operator_list": TRT_OPS_SOURCE, "parity": report.parity, "notes": report.notes,
                  "artefacts": entries, **({"engine_precision": engine_precision} if engine_precision else {})}
    write_json(engines_dir(bundle.path) / PROVENANCE_FILE, provenance)
    return seal_index(bundle.path)
