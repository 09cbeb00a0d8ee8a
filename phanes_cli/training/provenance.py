"""provenance.json: what a bundle was trained on and how, written by `phanes train` into every bundle.

A shipped model carries the same file, so `phanes models` can say where any bundle came from: the cohort
(manifest and its sha256, volumes per split and per source brain), the seed, the code (phanes version and
git commit when run from a checkout), the training time and device, and each stage's validation figures.
Calibration figures live in calibration.json (written by `phanes calibrate`).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import PROVENANCE_FILE
from phanes_cli.infra.versions import __version__
from phanes_cli.inputs.manifest import ManifestRow

__all__ = ["PROVENANCE_FILE", "source_commit", "training_provenance"]
PROVENANCE_FORMAT = 1


def source_commit() -> dict[str, Any] | None:
    """The git commit of the phanes source tree (and whether it had uncommitted changes); None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "uncommitted_changes": bool(dirty)}


def _split(rows: list[ManifestRow]) -> dict[str, Any]:
    sources = Counter(str(row.extra.get("template") or row.extra.get("source") or row.extra.get("site")
                          or "unrecorded") for row in rows)
    return {"volumes": len(rows), "sources": dict(sorted(sources.items()))}


def training_provenance(manifest: Path, train_rows: list[ManifestRow], val_rows: list[ManifestRow],
                        summary: dict[str, Any]) -> dict[str, Any]:
    """The provenance record of a finished training run (`summary`: the trainer's figures)."""
    return {
        "format": PROVENANCE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "phanes_version": __version__,
        "source": source_commit(),
        "cohort": {"manifest": str(manifest.resolve()),
                   "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
                   "train": _split(train_rows), "val": _split(val_rows)},
        "seed": summary.get("seed"),
        "training": {"seconds": summary.get("seconds"), "device": summary.get("device"),
                     "train_slices": summary.get("train_slices"), "val_slices": summary.get("val_slices")},
        "validation": {f"stage{i + 1}": stage for i, stage in enumerate(summary.get("stages", []))},
    }
