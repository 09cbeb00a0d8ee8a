"""`phanes export`: the bundle's three inference graphs as ONNX (and TensorRT engines on a GPU), checked at once.

The graphs are traced with torch's TorchScript-based ONNX exporter (`dynamo=False`: the torch.export-based
exporter needs onnxscript, which this project does not depend on) at opset 17 with a dynamic batch axis.
Before anything is written, each graph is checked against TensorRT's ONNX parser operator list and run by
ONNX Runtime next to eager torch through the whole pipeline, on random and on real brain slices; a
difference beyond `parity.PARITY_ATOL` refuses the export. The cheaper CPU backends (INT8 graphs, OpenVINO)
are then built and gated (`runtimes.gated`): one that fails is recorded with its figures, not written.
Artefacts, their provenance and the re-sealed bundle index are written last, atomically, so a failed export
leaves the bundle as it was.
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

from phanes_cli.core.bundle import Bundle, check_writable, load_bundle, seal_index
from phanes_cli.errors import ConfigError
from phanes_cli.infra.atomic import atomic_path, write_json
from phanes_cli.infra.versions import package_version
from phanes_cli.runtimes import GATED_BACKENDS
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
from phanes_cli.runtimes.gated import Gated, gate_backends
from phanes_cli.runtimes.graphs import GRAPHS, GraphSpec, graph_modules
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.parity import ParitySet, parity, parity_sets
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.tensorrt import TensorRTBackend, build_engine, tensorrt_unavailable
from phanes_cli.runtimes.trt_operators import SOURCE as TRT_OPS_SOURCE
from phanes_cli.runtimes.trt_operators import unsupported_nodes

OPSET = 17
EXPORTER = "torch.onnx.export, TorchScript tracer (dynamo=False)"
FORMATS = ("onnx", "tensorrt", "all")


@dataclass
class ExportReport:
    """What an export wrote and measured; `notes` say what was skipped and why."""

    written: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)  # per gated CPU backend: its verdict and figures
    not_gated: dict[str, str] = field(default_factory=dict)  # per named CPU backend not buildable here: why
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
                    report: ExportReport) -> tuple[dict[str, bytes], dict[str, Any], list[ParitySet]]:
    """Export, operator-check and parity-check the ONNX graphs in memory; torch's parity maps come back for the
    gated backends' checks."""
    modules = graph_modules(nets)  # type: ignore[arg-type]
    graphs = {spec.name: to_onnx(modules[spec.name], spec, bundle.config.preprocess.image_size) for spec in GRAPHS}
    cpu = torch.device("cpu")
    sets = parity_sets(bundle, TorchBackend(nets, cpu))  # type: ignore[arg-type]
    report.parity["onnxruntime"] = parity(bundle, OnnxRuntimeBackend(graphs, cpu), sets)
    return graphs, {artefact_name(name, "onnx"): {"graph": name, "format": "onnx", "precision": "fp32", "opset": OPSET}
                    for name in graphs}, sets


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
    sets = parity_sets(bundle, TorchBackend(nets, device, autocast=False))  # type: ignore[arg-type]
    report.parity["tensorrt"] = parity(bundle, TensorRTBackend(engines, device, profile.max), sets, precision)
    return engines, entries


def export_bundle(folder: str | Path, fmt: str = "onnx", precision: str = "fp32", profile: BatchProfile | None = None,
                  lpips_weights: str | None = None, gated: list[str] | None = None) -> ExportReport:
    """Export a bundle's graphs (and engines where TensorRT and a GPU are present) into BUNDLE/engines/, and
    build and gate the cheaper CPU backends `gated` (default: all of them whose runtime is installed)."""
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)} and --precision one of "
                          f"{', '.join(PRECISIONS)}")
    profile = (profile or BatchProfile()).validate()
    bundle = load_bundle(check_writable(folder), require_calibration=False)
    nets = load_networks(bundle, lpips_weights).eval()
    report = ExportReport()
    trt_missing = tensorrt_unavailable() if fmt in ("tensorrt", "all") else None
    if fmt == "tensorrt" and trt_missing:
        raise RuntimeUnavailable(f"cannot build TensorRT engines here: {trt_missing}")
    graphs, entries, sets = _onnx_artefacts(bundle, nets, report)
    blobs = {artefact_name(name, "onnx"): data for name, data in graphs.items()}
    _add_gated(gate_backends(bundle, graphs, sets, list(GATED_BACKENDS) if gated is None else gated), blobs, entries,
               report)
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


def _add_gated(result: Gated, blobs: dict[str, bytes], entries: dict[str, Any], report: ExportReport) -> None:
    blobs.update(result.blobs)
    entries.update(result.entries)
    report.gates, report.not_gated = result.gates, result.not_gated
    report.notes += result.notes


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
                  "versions": {p: package_version(p) for p in ("torch", "onnx", "onnxruntime", "openvino", "tensorrt")},
                  "weights": {**{w: index[w] for w in GRAPH_WEIGHTS.values()}, "lpips": lpips_sha},
                  "tensorrt_operator_list": TRT_OPS_SOURCE, "parity": report.parity, "gates": report.gates,
                  "not_gated": report.not_gated, "notes": report.notes,
                  "artefacts": entries, **({"engine_precision": engine_precision} if engine_precision else {})}
    write_json(engines_dir(bundle.path) / PROVENANCE_FILE, provenance)
    return seal_index(bundle.path)
