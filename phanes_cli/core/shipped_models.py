"""Shipped model bundles (phanes_cli/data/models/<name>/) and the figures `phanes models` lists for any bundle.

`phanes screen` without --bundle takes the default shipped bundle: the only one, or the one named in the
models folder's DEFAULT file. `PHANES_MODELS_DIR` names another folder of shipped models (a site-wide one,
or a test's). Bundles are verified by their hashes when loaded (core.bundle), like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import CALIBRATION_FILE, INDEX_FILE, PROVENANCE_FILE
from phanes_cli.errors import BundleError

MODELS_ENV = "PHANES_MODELS_DIR"
DEFAULT_FILE = "DEFAULT"
NO_MODEL_HELP = ("no pretrained model ships with this phanes yet. Pass --bundle BUNDLE, a model you trained: "
                 "`phanes train --config configs/cpu.yaml --data MANIFEST --out BUNDLE`, then "
                 "`phanes calibrate --bundle BUNDLE --data MANIFEST` (README: Quick start)")


def models_dir() -> Path:
    """The folder of shipped bundles: $PHANES_MODELS_DIR, else the package's data/models."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "models"


def shipped_bundles() -> list[Path]:
    """Every bundle folder in the models folder, by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / INDEX_FILE).is_file())


def default_bundle() -> Path:
    """The shipped bundle `phanes screen` uses without --bundle; a BundleError says what to do when there is none."""
    bundles = shipped_bundles()
    if not bundles:
        raise BundleError(NO_MODEL_HELP)
    if len(bundles) == 1:
        return bundles[0]
    marker = models_dir() / DEFAULT_FILE
    name = marker.read_text().strip() if marker.is_file() else ""
    chosen = [b for b in bundles if b.name == name]
    if not chosen:
        raise BundleError(f"{models_dir()}: several shipped models ({', '.join(b.name for b in bundles)}) and no "
                          f"{DEFAULT_FILE} file naming one of them; pass --bundle")
    return chosen[0]


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
        cal, prov = self.calibration, self.provenance or {}
        training = prov.get("training") or (self.versions or {}).get("training") or {}
        seconds = training.get("seconds")
        tuning = (cal or {}).get("tuning") or {}
        figures = tuning.get("validation") or {}
        dice = figures.get("dice_mean", figures.get("dice"))
        cohort = prov.get("cohort", {})
        sources = ", ".join(sorted({name for split in ("train", "val")
                                    for name in cohort.get(split, {}).get("sources", {})}))
        commit = (prov.get("source") or {}).get("commit")
        return {
            "calibration": (f"mask {cal['mask_threshold']:.4g}, anomaly {cal['anomaly_threshold']:.4g}"
                            if cal else "not calibrated"),
            "tuning": f"validation Dice {dice:.3f}" if isinstance(dice, (int, float)) else ("tuned" if tuning else "-"),
            "training": f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "-",
            "trained on": sources or "-",
            "commit": commit[:10] if isinstance(commit, str) else "-",
        }


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def bundle_figures(folder: Path) -> BundleFigures:
    """The recorded figures of a bundle folder; missing or unreadable files read as None."""
    return BundleFigures(folder, _json(folder / CALIBRATION_FILE), _json(folder / PROVENANCE_FILE),
                         _json(folder / "versions.json"))
