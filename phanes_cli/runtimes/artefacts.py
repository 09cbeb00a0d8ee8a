"""Exported artefacts inside a bundle (engines/): provenance, and the checks that refuse tampered or stale ones.

`engines/provenance.json` describes every artefact: the graph it holds, the sha256 of the weights it was
built from, opset, exporter and runtime versions, precision, batch profile and, for TensorRT engines, the
TensorRT version and GPU compute capability; under `gates`, the export gate's verdict on each cheaper CPU
backend (`runtimes.parity.gate`). The bundle index (bundle.json) seals the files; a backend loads an artefact
only through `read_artefact`, which checks the seal, the provenance and staleness, and a gated backend runs
only when `read_gate` finds that it passed with the runtime version installed now.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import ENGINES_DIR, INDEX_FILE, WEIGHT_FILES, Bundle
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.infra.versions import package_version

PROVENANCE_FILE = "provenance.json"
BENCH_FILE = "bench.json"
PRECISIONS = ("fp32", "fp16")  # TensorRT engine precisions `phanes export` builds
GRAPH_WEIGHTS = {"stage1": WEIGHT_FILES["ra"], "stage2": WEIGHT_FILES["generator"]}  # lpips: weights outside the bundle


class ArtefactError(BundleError):
    """An exported graph or engine that cannot be used: missing, tampered, stale or built for another machine."""


class NotExported(ArtefactError):
    """The bundle has no such artefact: a normal state, `auto` moves on quietly."""


class RuntimeUnavailable(ArtefactError):
    """The runtime itself is missing here (no tensorrt package, no CUDA provider): `auto` moves on quietly."""


class EngineIncompatible(ArtefactError):
    """A TensorRT engine built for another TensorRT version or GPU: refused, the next backend runs instead."""


class GateRefused(ArtefactError):
    """A backend that failed its export gate: refused with the failing figures when named; `auto` skips it quietly
    (the export's verdict, recorded with the run and shown by `phanes doctor`)."""


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes a graph is built for (TensorRT optimisation profile; ONNX graphs take any batch)."""

    min: int = 1
    opt: int = 32
    max: int = 64

    def validate(self) -> BatchProfile:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engines_dir(bundle_path: Path) -> Path:
    return bundle_path / ENGINES_DIR


def reexport_hint(bundle_path: Path) -> str:
    return f"re-export with `phanes export --bundle {bundle_path}`"


def _sealed_index(bundle: Bundle) -> dict[str, str]:
    """The bundle's file list, checked to be the index this Bundle was loaded with."""
    data = (bundle.path / INDEX_FILE).read_bytes()
    if sha256_bytes(data) != bundle.hash:
        raise BundleError(f"{bundle.path / INDEX_FILE}: bundle changed since it was loaded; reload it")
    files: dict[str, str] = json.loads(data)["files"]
    return files


def read_provenance(bundle: Bundle) -> dict[str, Any]:
    """engines/provenance.json of a bundle, verified against the index; ArtefactError when absent or changed."""
    path = engines_dir(bundle.path) / PROVENANCE_FILE
    listed = _sealed_index(bundle).get(f"{ENGINES_DIR}/{PROVENANCE_FILE}")
    if listed is None or not path.is_file():
        raise NotExported(f"{path}: no exported graphs in this bundle; "
                          f"export them with `phanes export --bundle {bundle.path}`")
    data = path.read_bytes()
    if sha256_bytes(data) != listed:
        raise ArtefactError(f"{path}: changed since export (hash mismatch); {reexport_hint(bundle.path)}")
    return _checked_provenance(path, data, bundle.path)


def _checked_provenance(path: Path, data: bytes, bundle_path: Path) -> dict[str, Any]:
    """The provenance record, refused unless it has the shape phanes writes: a re-sealed bundle may hold anything."""
    try:
        provenance = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtefactError(f"{path}: unreadable ({exc}); {reexport_hint(bundle_path)}") from exc
    artefacts = provenance.get("artefacts", {}) if isinstance(provenance, dict) else None
    if not isinstance(artefacts, dict) or not all(isinstance(entry, dict) for entry in artefacts.values()):
        raise ArtefactError(f"{path}: not a provenance record phanes wrote; {reexport_hint(bundle_path)}")
    if provenance.get("engine_precision", PRECISIONS[0]) not in PRECISIONS:
        raise ArtefactError(f"{path}: engine precision is not one of {', '.join(PRECISIONS)}; "
                            f"{reexport_hint(bundle_path)}")
    problem = _gates_problem(provenance.get("gates", {}))
    if problem:
        raise ArtefactError(f"{path}: {problem} (not a gate verdict phanes wrote); {reexport_hint(bundle_path)}")
    return provenance


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gates_problem(gates: Any) -> str | None:
    """What is wrong with the `gates` section (key and what it holds), or None when each verdict has the fields
    `read_gate` and `parity.verdict_line` read, of their types."""
    if not isinstance(gates, dict):
        return f"key 'gates' holds {type(gates).__name__}, not a mapping"
    for name, verdict in gates.items():
        key = f"gates.{name[:100]}"  # shown with repr: a name may hold any text, line breaks too
        if not isinstance(verdict, dict):
            return f"key {key!r} holds {type(verdict).__name__}, not a mapping"
        if not isinstance(verdict.get("passed"), bool):
            return f"key {key + '.passed'!r} is missing or not true/false"
        if not verdict["passed"]:
            if not isinstance(verdict.get("reason"), str) or len(verdict["reason"].splitlines()) > 1:
                return f"key {key + '.reason'!r} is missing or not one line of text"
            continue
        checks = {"runtime_version": isinstance(verdict.get("runtime_version"), (str, type(None))),
                  "mask_slices": _number(verdict.get("mask_slices")),
                  "mask_brains": isinstance(verdict.get("mask_brains"), list),
                  "parity.brain.anomaly": _number(_at(verdict, "parity", "brain", "anomaly")),
                  "masks": isinstance(verdict.get("masks"), dict) and all(
                      isinstance(row, dict) and all(_number(row.get(k)) for k in ("agreement", "dice", "fp32_voxels"))
                      for row in verdict["masks"].values())}
        wrong = next((field for field, ok in checks.items() if not ok), None)
        if wrong:
            return f"key {key + '.' + wrong!r} is missing or of the wrong type"
    return None


def _at(value: Any, *keys: str) -> Any:
    """value[key1][key2]... through mappings, else None."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def read_artefact(bundle: Bundle, name: str) -> tuple[bytes, dict[str, Any]]:
    """The bytes and provenance entry of engines/NAME, refused when tampered with, unsealed or stale."""
    path = engines_dir(bundle.path) / name
    index = _sealed_index(bundle)
    entry = read_provenance(bundle).get("artefacts", {}).get(name)
    listed = index.get(f"{ENGINES_DIR}/{name}")
    if entry is None or listed is None or not path.is_file():
        raise NotExported(f"{path}: not exported for this bundle; {reexport_hint(bundle.path)}")
    data = path.read_bytes()
    if sha256_bytes(data) != listed or sha256_bytes(data) != entry.get("sha256"):
        raise ArtefactError(f"{path}: changed since export (hash mismatch); the file is refused, "
                            f"{reexport_hint(bundle.path)}")
    graph = entry.get("graph")
    weights = GRAPH_WEIGHTS.get(graph) if isinstance(graph, str) else None
    if weights is not None and entry.get("source_sha256") != index.get(weights):
        raise ArtefactError(f"{path}: stale, exported from other weights ({weights} changed since export); "
                            f"{reexport_hint(bundle.path)}")
    return data, entry


def artefact_name(graph: str, fmt: str, precision: str = "fp32") -> str:
    """engines/ file name of one graph: stage1.onnx, stage2.int8.onnx, stage1.fp16.engine, ..."""
    if fmt == "onnx":
        return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
    return f"{graph}.{precision}.engine"


def read_gate(bundle: Bundle, backend: str, runtime: str) -> dict[str, Any]:
    """The export gate's verdict on `backend` (whose numbers come from the package `runtime`), when it passed
    with the version of `runtime` installed now; NotExported when never gated, else GateRefused / ArtefactError."""
    verdict: dict[str, Any] | None = read_provenance(bundle).get("gates", {}).get(backend)
    if verdict is None:
        raise NotExported(f"{backend} was not gated when this bundle was exported; {reexport_hint(bundle.path)}")
    if not verdict["passed"]:
        reason = str(verdict["reason"])
        raise GateRefused(f"{backend} failed its export gate: {reason}")
    installed = package_version(runtime)
    if verdict["runtime_version"] != installed:
        raise ArtefactError(f"{backend} was gated with {runtime} {verdict['runtime_version']}, {installed} is "
                            f"installed; {reexport_hint(bundle.path)}")
    return verdict
