"""Shipped model bundles (phanes_cli/data/models/<name>/) and the figures `phanes models` lists for any bundle.

`phanes screen` without --bundle takes the default shipped bundle: the only one, or the one named in the
models folder's DEFAULT file. `PHANES_MODELS_DIR` names another folder of shipped models (a site-wide one,
or a test's). Bundles are verified by their hashes when loaded (core.bundle), like any other, and never
written (`core.bundle.check_writable`, which is why `models_dir` lives there).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import CALIBRATION_FILE, INDEX_FILE, MODELS_ENV, PROVENANCE_FILE, models_dir
from phanes_cli.errors import BundleError

DEFAULT_FILE = "DEFAULT"
MAX_JSON_BYTES = 1 << 20  # a bundle's JSON files are a few kB; a larger one is not read into memory for a table row
NO_MODEL_HELP = ("no pretrained model ships with this phanes yet. Pass --bundle BUNDLE, a model you trained: "
                 "`phanes train --config configs/cpu.yaml --data MANIFEST --out BUNDLE`, then "
                 "`phanes calibrate --bundle BUNDLE --data MANIFEST` (README: Quick start with your own data)")


def shipped_bundles() -> list[Path]:
    """Every bundle folder in the models folder, by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / INDEX_FILE).is_file())


def env_problem() -> str | None:
    """Why $PHANES_MODELS_DIR cannot be the models folder (set, but not a folder), else None."""
    env = os.environ.get(MODELS_ENV)
    if not env or Path(env).is_dir():
        return None
    what = "a file, not a folder" if Path(env).exists() else "no such folder"
    return f"${MODELS_ENV} names {env}: {what}; point it at a folder of model bundles or unset it"


def default_bundle() -> Path:
    """The shipped bundle `phanes screen` uses without --bundle; a BundleError says what to do when there is none."""
    bundles = shipped_bundles()
    if not bundles:
        raise BundleError(env_problem() or NO_MODEL_HELP)
    if len(bundles) == 1:
        return bundles[0]
    marker = models_dir() / DEFAULT_FILE
    name = _marker_name(marker)
    chosen = [b for b in bundles if b.name == name]
    if not chosen:
        named = f"{DEFAULT_FILE} names {name!r}, not one of them" if name else f"no {DEFAULT_FILE} file names one"
        raise BundleError(f"{models_dir()}: several shipped models ({', '.join(b.name for b in bundles)}) and "
                          f"{named}; pass --bundle")
    return chosen[0]


def _marker_name(marker: Path) -> str:
    """The bundle name in the DEFAULT file: its first line, at most 255 bytes, undecodable bytes replaced."""
    if not marker.is_file():
        return ""
    with open(marker, "rb") as handle:
        head = handle.read(256)
    lines = head.decode("utf-8", errors="replace").strip().splitlines()
    return lines[0].strip()[:255] if lines else ""


def find_bundles(roots: list[Path], depth: int = 3) -> list[Path]:
    """Bundle folders (holding bundle.json) under each root, at most `depth` levels down, hidden folders skipped."""
    found: list[Path] = []
    for root in roots:
        if (root / INDEX_FILE).is_file():
            found.append(root)
            continue
        for level in range(1, depth + 1):
            pattern = "/".join(["*"] * level) + f"/{INDEX_FILE}"
            found += [p.parent for p in root.glob(pattern) if not any(part.startswith(".") for part in
                                                                      p.relative_to(root).parts)]
    return sorted(set(found))


@dataclass(frozen=True)
class BundleFigures:
    """What `phanes models` prints for one bundle (read from its JSON files, without loading the weights)."""

    path: Path
    calibration: dict[str, Any] | None
    provenance: dict[str, Any] | None
    versions: dict[str, Any] | None

    def summary(self) -> dict[str, str]:
        """One table row. The files are read unverified and may hold anything: a value of the wrong type or
        shape reads as missing ("-"), never as an error, and long text is cut."""
        cal, prov = self.calibration, self.provenance
        mask, anomaly = _number(_get(cal, "mask_threshold")), _number(_get(cal, "anomaly_threshold"))
        training = _get(prov, "training") or _get(self.versions, "training")
        seconds = _number(_get(training, "seconds"))
        validation = _get(cal, "tuning", "validation")
        dice = _number(_get(validation, "dice_mean"))
        dice = _number(_get(validation, "dice")) if dice is None else dice
        sources = sorted({str(name) for split in ("train", "val")
                          for name in (_get(prov, "cohort", split, "sources") or {}) if isinstance(name, str)})
        commit = _get(prov, "source", "commit")
        if cal is None:
            calibration = "not calibrated"
        else:
            calibration = "-" if mask is None or anomaly is None else f"mask {mask:.4g}, anomaly {anomaly:.4g}"
        return {
            "calibration": calibration,
            "tuning": f"validation Dice {dice:.3f}" if dice is not None else ("tuned" if _get(cal, "tuning") else "-"),
            "training": f"{seconds / 60:.1f} min" if seconds is not None else "-",
            "trained on": _cut(", ".join(sources)) or "-",
            "commit": commit[:10] if isinstance(commit, str) else "-",
        }


def _get(value: Any, *keys: str) -> Any:
    """value[key1][key2]... where every level is a JSON object holding the key, else None."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float | None:
    """A finite JSON number (not a boolean) as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return None
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def bundle_figures(folder: Path) -> BundleFigures:
    """The recorded figures of a bundle folder; missing or unreadable files read as None."""
    return BundleFigures(folder, _json(folder / CALIBRATION_FILE), _json(folder / PROVENANCE_FILE),
                         _json(folder / "versions.json"))
