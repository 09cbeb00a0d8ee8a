"""The model bundle: one folder that holds everything inference needs, verified on load.

Layout: config.json, ra.safetensors, generator.safetensors, calibration.json, versions.json and
bundle.json (sha256 of every other file). Loading recomputes the hashes and refuses a bundle whose files
are missing or changed. Weights are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from phanes_cli.config import PhanesConfig, config_from_dict
from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.infra.atomic import atomic_path, json_bytes, stage_bytes, write_json
from phanes_cli.infra.folders import claim_folder
from phanes_cli.infra.versions import runtime_versions

BUNDLE_FORMAT = 1
WEIGHT_FILES = {"ra": "ra.safetensors", "generator": "generator.safetensors"}
CALIBRATION_FILE = "calibration.json"
INDEX_FILE = "bundle.json"
PROVENANCE_FILE = "provenance.json"  # what the model was trained on and how (training.provenance)
ENGINES_DIR = "engines"  # ONNX graphs, TensorRT engines and their provenance (phanes_cli.runtimes)
MODELS_ENV = "PHANES_MODELS_DIR"
PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
# An editable install imports the package from a tree of links to the sources: both are the installed package.
IMPORTED_MODELS = Path(os.path.abspath(__file__)).parents[1] / "data" / "models"
WRITE_HINT = "copy the bundle folder to one of your own and run the command on the copy"


def models_dir() -> Path:
    """The folder of shipped bundles: $PHANES_MODELS_DIR, else the package's data/models (core.shipped_models)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else PACKAGE_MODELS


def check_writable(folder: str | Path, hint: str = WRITE_HINT) -> Path:
    """`folder` unless it is (or lies in, links followed) a folder of shipped models: the one rule on writing
    into a bundle. Every writer of a bundle's files asks it first, so nothing the installed package ships changes;
    `hint` says what to do instead."""
    folder = Path(folder)
    roots = {Path(os.path.abspath(r)) for r in (models_dir(), PACKAGE_MODELS, IMPORTED_MODELS)}
    roots |= {r.resolve() for r in roots}
    where = {Path(os.path.abspath(folder)), folder.resolve(), (folder / INDEX_FILE).resolve().parent}
    inside = sorted(str(root) for root in roots if any(w.is_relative_to(root) for w in where))
    if inside:
        raise BundleError(f"{folder}: inside the folder of models shipped with phanes ({inside[0]}), which phanes "
                          f"never writes into: {hint}")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its config, weights, calibration (None before calibration) and content hash."""

    path: Path
    config: PhanesConfig
    ra_state: dict[str, torch.Tensor]
    generator_state: dict[str, torch.Tensor]
    calibration: Calibration | None
    versions: dict[str, Any]
    hash: str  # sha256 of bundle.json: identifies this exact bundle folder (export re-seals it)
    content_key: str = ""  # `content_key`: what determines a screening's outputs (resume keys on it)

    def require_calibration(self) -> Calibration:
        if self.calibration is None:
            raise BundleError(
                f"{self.path}: bundle is not calibrated yet; "
                f"run `phanes calibrate --bundle {self.path} --data MANIFEST`"
            )
        return self.calibration


def _index_payload(folder: Path, staged: dict[str, Path] | None = None) -> dict[str, Any]:
    """The index of `folder`; `staged` maps a file name to the temporary file that is about to replace it."""
    staged = staged or {}
    files = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name != INDEX_FILE and not p.name.startswith(".")
    )
    engines = folder / ENGINES_DIR  # exported graphs and engines: verified when a backend uses them
    if engines.is_dir():
        files += sorted(
            f"{ENGINES_DIR}/{p.name}" for p in engines.iterdir() if p.is_file() and not p.name.startswith(".")
        )
    names = sorted(set(files) | set(staged))
    return {"format": BUNDLE_FORMAT, "files": {name: _sha256(staged.get(name, folder / name)) for name in names},
            "written": datetime.now(timezone.utc).isoformat()}


def _write_index(folder: Path) -> str:
    write_json(folder / INDEX_FILE, _index_payload(folder))
    return _sha256(folder / INDEX_FILE)


def save_bundle(folder: str | Path, config: PhanesConfig, ra: torch.nn.Module, generator: torch.nn.Module,
                calibration: Calibration | None = None, extra: dict[str, Any] | None = None,
                files: dict[str, Any] | None = None) -> str:
    """Write (or rewrite) a bundle; returns its hash. Every file is written atomically, the index last.

    `files`: further JSON files by name (provenance.json), covered by the index like the rest."""
    folder = check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config.to_dict())
    for key, module in (("ra", ra), ("generator", generator)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        with atomic_path(folder / WEIGHT_FILES[key]) as tmp:
            save_file(state, str(tmp))
    write_json(folder / "versions.json", {**runtime_versions(), **(extra or {})})
    for name, payload in (files or {}).items():
        write_json(folder / name, payload)
    if calibration is not None:
        write_json(folder / CALIBRATION_FILE, calibration.to_dict())
    elif (folder / CALIBRATION_FILE).exists():
        (folder / CALIBRATION_FILE).unlink()
    return _write_index(folder)


def write_calibration(folder: str | Path, calibration: Calibration, config: PhanesConfig | None = None) -> str:
    """Commit calibration thresholds (and the config that made them, if given) into a verified bundle.

    Call it only once the calibration is computed (see `_commit`); returns the new bundle hash.
    """
    folder = Path(folder)
    load_bundle(folder, require_calibration=False)
    Calibration.from_dict(calibration.to_dict(), folder / CALIBRATION_FILE)
    contents = {CALIBRATION_FILE: calibration.to_dict()}
    if config is not None:
        contents["config.json"] = config.to_dict()
    return _commit(folder, contents)


def write_provenance(folder: str | Path, provenance: dict[str, Any]) -> str:
    """Replace a verified bundle's provenance.json (e.g. a shipped model's cohort recipe); returns the new hash.
    Weights, config and calibration are untouched, so the content key stays."""
    folder = Path(folder)
    load_bundle(folder, require_calibration=False)
    return _commit(folder, {PROVENANCE_FILE: provenance})


def _commit(folder: Path, contents: dict[str, Any]) -> str:
    """The new JSON files and index are first written in full under temporary names, then renamed over the old
    ones, the index last. Any failure before the renames leaves the bundle byte-identical."""
    check_writable(folder)
    staged: dict[str, Path] = {}
    try:
        for name, payload in contents.items():
            staged[name] = stage_bytes(folder / name, json_bytes(payload))
        staged[INDEX_FILE] = stage_bytes(folder / INDEX_FILE, json_bytes(_index_payload(folder, staged)))
        for name, tmp in staged.items():  # dicts keep insertion order: the index is renamed last
            os.replace(tmp, folder / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return _sha256(folder / INDEX_FILE)


def seal_index(folder: str | Path) -> str:
    """Re-seal a verified bundle's index after adding artefacts under engines/; returns the new hash."""
    folder = check_writable(folder)
    load_bundle(folder, require_calibration=False)
    return _write_index(folder)


def copy_bundle(source: str | Path, target: str | Path) -> Bundle:
    """The verified bundle `source` copied into `target` (new or empty): the files its index lists and the index,
    nothing else (no checkpoints); the copy is verified like any bundle and must be `source`'s exact index."""
    source, model = Path(source), load_bundle(source, require_calibration=False)
    target = claim_folder(check_writable(target), (), "a copy of a model bundle")
    listed = json.loads((source / INDEX_FILE).read_text(encoding="utf-8"))["files"]
    for name in [*listed, INDEX_FILE]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    copy = load_bundle(target, require_calibration=False)
    if copy.hash != model.hash:
        raise BundleError(f"{source}: changed while it was copied to {target}; copy it again")
    return copy


def load_bundle(folder: str | Path, require_calibration: bool = True) -> Bundle:
    """Verify and load a bundle; any missing, extra-changed or unreadable file is a BundleError."""
    folder = Path(folder)
    if folder.is_file():
        raise BundleError(f"{folder}: is a file; --bundle takes a model bundle folder (the one holding {INDEX_FILE})")
    if not folder.is_dir():
        raise BundleError(f"{folder}: model bundle folder not found")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise BundleError(f"{folder}: not a model bundle ({INDEX_FILE} missing); train one with `phanes train`")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        listed: dict[str, str] = index["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{index_path}: unreadable bundle index ({exc})") from exc
    if index.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder}: bundle format {index.get('format')} is not supported (expected {BUNDLE_FORMAT})")
    _check_index_names(folder, listed)
    required = ["config.json", "versions.json", *WEIGHT_FILES.values()]
    missing = [name for name in required if name not in listed or not (folder / name).is_file()]
    if missing:
        raise BundleError(f"{folder}: incomplete bundle, missing {', '.join(missing)}")
    for name, digest in listed.items():
        if name.startswith(f"{ENGINES_DIR}/"):
            continue  # phanes_cli.runtimes.artefacts checks these when a backend loads them, so torch still runs
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: incomplete bundle, missing {name}")
        if _sha256(path) != digest:
            raise BundleError(
                f"{path}: file changed since the bundle was written (hash mismatch); the bundle is refused"
            )
    guarded = (CALIBRATION_FILE, *WEIGHT_FILES.values())
    unlisted = [p.name for p in folder.iterdir() if p.is_file() and p.name in guarded and p.name not in listed]
    if unlisted:
        raise BundleError(f"{folder}: file(s) {', '.join(unlisted)} are not covered by the bundle index")
    config = _read_config(folder / "config.json")
    calibration = _read_calibration(folder / CALIBRATION_FILE) if CALIBRATION_FILE in listed else None
    if require_calibration and calibration is None:
        raise BundleError(
            f"{folder}: bundle is not calibrated yet; run `phanes calibrate --bundle {folder} --data MANIFEST`"
        )
    return Bundle(
        path=folder,
        config=config,
        ra_state=_load_weights(folder / WEIGHT_FILES["ra"]),
        generator_state=_load_weights(folder / WEIGHT_FILES["generator"]),
        calibration=calibration,
        versions=_read_versions(folder / "versions.json"),
        hash=_sha256(index_path),
        content_key=content_key(listed),
    )


KEYED_FILES = ("config.json", *WEIGHT_FILES.values(), CALIBRATION_FILE)  # what determines the outputs


def content_key(listed: dict[str, str]) -> str:
    """sha256 over the verified hashes of the config, weights and calibration only.

    The index hash changes whenever `phanes export` or `bench` re-seal it (new engines, versions), yet
    the maps do not: resume keys on this, so a re-export redoes nothing and a new calibration redoes all.
    """
    payload = json.dumps({name: listed.get(name) for name in KEYED_FILES}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _check_index_names(folder: Path, listed: Any) -> None:
    """Every index entry names a file inside the bundle: no absolute path, '..' or link leading out of it."""
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise BundleError(f"{folder / INDEX_FILE}: unreadable bundle index ('files' must map file names to hashes)")
    root = folder.resolve()
    for name in listed:
        parts = PurePosixPath(name).parts
        if not name or "\\" in name or PurePosixPath(name).is_absolute() or any(p in ("..", ".", "") for p in parts):
            raise BundleError(f"{folder / INDEX_FILE}: index entry {name!r} is not a plain path inside the bundle; "
                              "the bundle is refused")
        if not (folder / name).resolve().is_relative_to(root):
            raise BundleError(f"{folder / INDEX_FILE}: index entry {name!r} leads outside the bundle (a link?); "
                              "the bundle is refused")


def _read_config(path: Path) -> PhanesConfig:
    """The bundle's config; binary or malformed bytes are a BundleError (a re-sealed index vouches for nothing)."""
    try:
        return config_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not a readable JSON config ({type(exc).__name__})") from exc
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def _read_calibration(path: Path) -> Calibration:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable calibration ({exc})") from exc
    return Calibration.from_dict(values, path)


def _read_versions(path: Path) -> dict[str, Any]:
    try:
        versions = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not a readable JSON file ({type(exc).__name__})") from exc
    if not isinstance(versions, dict):
        raise BundleError(f"{path}: must be a JSON object")
    return versions


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, say) is refused, never unpickled."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for foreign formats
        raise BundleError(f"{path}: not a valid safetensors weight file ({type(exc).__name__}: {exc})") from exc
