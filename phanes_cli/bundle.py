"""The model bundle: one folder that holds everything inference needs, verified on load.

Layout: config.json, ra.safetensors, generator.safetensors, calibration.json, versions.json and
bundle.json (sha256 of every other file). Loading recomputes the hashes and refuses a bundle whose files
are missing or changed. Weights are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from phanes_cli import __version__
from phanes_cli.atomic import atomic_path, write_json
from phanes_cli.backends import PhanesNetworks
from phanes_cli.config import PhanesConfig, config_from_dict
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.pipeline import Calibration

BUNDLE_FORMAT = 1
WEIGHT_FILES = {"ra": "ra.safetensors", "generator": "generator.safetensors"}
CALIBRATION_FILE = "calibration.json"
INDEX_FILE = "bundle.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def runtime_versions() -> dict[str, str | None]:
    return {"phanes": __version__, "torch": torch.__version__, "lpips": _pkg_version("lpips"),
            "python": platform.python_version()}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its config, weights, calibration (None before calibration) and content hash."""

    path: Path
    config: PhanesConfig
    ra_state: dict[str, torch.Tensor]
    generator_state: dict[str, torch.Tensor]
    calibration: Calibration | None
    versions: dict[str, Any]
    hash: str  # sha256 of bundle.json: identifies this exact model and calibration

    def networks(self, lpips_weights: str | None = None) -> PhanesNetworks:
        nets = PhanesNetworks(self.config, lpips_weights=lpips_weights)
        for name, module, state in (("ra", nets.ra, self.ra_state), ("generator", nets.generator, self.generator_state)):
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise BundleError(f"{self.path / WEIGHT_FILES[name]}: weights do not fit the bundle's config ({str(exc).splitlines()[0]})") from exc
        return nets.eval()

    def require_calibration(self) -> Calibration:
        if self.calibration is None:
            raise BundleError(f"{self.path}: bundle is not calibrated yet; run `phanes calibrate --bundle {self.path} --data MANIFEST`")
        return self.calibration


def _write_index(folder: Path) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != INDEX_FILE and not p.name.startswith("."))
    index = {"format": BUNDLE_FORMAT, "files": {name: _sha256(folder / name) for name in files},
             "written": datetime.now(timezone.utc).isoformat()}
    write_json(folder / INDEX_FILE, index)
    return _sha256(folder / INDEX_FILE)


def save_bundle(folder: str | Path, config: PhanesConfig, ra: torch.nn.Module, generator: torch.nn.Module,
                calibration: Calibration | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write (or rewrite) a bundle; returns its hash. Every file is written atomically, the index last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config.to_dict())
    for key, module in (("ra", ra), ("generator", generator)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        with atomic_path(folder / WEIGHT_FILES[key]) as tmp:
            save_file(state, str(tmp))
    write_json(folder / "versions.json", {**runtime_versions(), **(extra or {})})
    if calibration is not None:
        write_json(folder / CALIBRATION_FILE, calibration.to_dict())
    elif (folder / CALIBRATION_FILE).exists():
        (folder / CALIBRATION_FILE).unlink()
    return _write_index(folder)


def write_calibration(folder: str | Path, calibration: Calibration) -> str:
    """Store calibration thresholds in a verified bundle and re-seal its index; returns the new hash."""
    folder = Path(folder)
    load_bundle(folder, require_calibration=False)
    write_json(folder / CALIBRATION_FILE, calibration.to_dict())
    return _write_index(folder)


def load_bundle(folder: str | Path, require_calibration: bool = True) -> Bundle:
    """Verify and load a bundle; any missing, extra-changed or unreadable file is a BundleError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: model bundle folder not found")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise BundleError(f"{folder}: not a model bundle ({INDEX_FILE} missing); train one with `phanes train`")
    try:
        index = json.loads(index_path.read_text())
        listed: dict[str, str] = index["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{index_path}: unreadable bundle index ({exc})") from exc
    if index.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder}: bundle format {index.get('format')} is not supported (expected {BUNDLE_FORMAT})")
    required = ["config.json", "versions.json", *WEIGHT_FILES.values()]
    missing = [name for name in required if name not in listed or not (folder / name).is_file()]
    if missing:
        raise BundleError(f"{folder}: incomplete bundle, missing {', '.join(missing)}")
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: incomplete bundle, missing {name}")
        if _sha256(path) != digest:
            raise BundleError(f"{path}: file changed since the bundle was written (hash mismatch); the bundle is refused")
    unlisted = [p.name for p in folder.iterdir() if p.is_file() and p.name in (CALIBRATION_FILE, *WEIGHT_FILES.values()) and p.name not in listed]
    if unlisted:
        raise BundleError(f"{folder}: file(s) {', '.join(unlisted)} are not covered by the bundle index")
    try:
        config = config_from_dict(json.loads((folder / "config.json").read_text()))
    except ConfigError as exc:
        raise BundleError(f"{folder / 'config.json'}: {exc}") from exc
    calibration = None
    if CALIBRATION_FILE in listed:
        try:
            calibration = Calibration(**json.loads((folder / CALIBRATION_FILE).read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise BundleError(f"{folder / CALIBRATION_FILE}: unreadable calibration ({exc})") from exc
    if require_calibration and calibration is None:
        raise BundleError(f"{folder}: bundle is not calibrated yet; run `phanes calibrate --bundle {folder} --data MANIFEST`")
    return Bundle(
        path=folder,
        config=config,
        ra_state=_load_weights(folder / WEIGHT_FILES["ra"]),
        generator_state=_load_weights(folder / WEIGHT_FILES["generator"]),
        calibration=calibration,
        versions=json.loads((folder / "versions.json").read_text()),
        hash=_sha256(index_path),
    )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, say) is refused, never unpickled."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for foreign formats
        raise BundleError(f"{path}: not a valid safetensors weight file ({type(exc).__name__}: {exc})") from exc
