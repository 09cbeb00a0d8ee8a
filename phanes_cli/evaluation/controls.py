"""Healthy controls and lesion-wise recall by lesion size.

A screening tool is judged as much by what it flags in healthy brains as by what it finds in patients:
a test volume of kind `healthy` without a lesion mask is an all-negative volume, and everything a
method predicts there is a false positive (components and millilitres per healthy volume). Recall by
size bin says which lesions a method misses: a good pooled Dice can hide that every lesion under 1 mL
is lost. Components use `lesions.label_components` (full connectivity), as every lesion count does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from phanes_cli.core.components import label_components

_CONTROL_FIELDS: list[pa.Field] = [pa.field("method", pa.string()), pa.field("id", pa.string()),
                                   pa.field("fp_components", pa.int64()), pa.field("fp_ml", pa.float64())]
CONTROLS_SCHEMA = pa.schema(_CONTROL_FIELDS)
SIZE_BINS: tuple[tuple[str, float, float], ...] = (("<1 mL", 0.0, 1.0), ("1-10 mL", 1.0, 10.0),
                                                   (">10 mL", 10.0, float("inf")))


@dataclass(frozen=True)
class ControlFalsePositives:
    """What a method flags in one healthy volume: every component and every millilitre is a false positive."""

    components: int
    ml: float


def control_false_positives(pred: np.ndarray, brain: np.ndarray, voxel_ml: float) -> ControlFalsePositives:
    """Predicted components and volume (mL) inside the brain of a healthy (all-negative) volume."""
    flagged = np.asarray(pred, dtype=bool) & np.asarray(brain, dtype=bool)
    _, n = label_components(flagged)
    return ControlFalsePositives(components=n, ml=float(flagged.sum()) * voxel_ml)


def size_bin(volume_ml: float) -> str:
    """The name of the size bin a lesion of `volume_ml` falls in (lower edge inclusive)."""
    return next(name for name, low, high in SIZE_BINS if low <= volume_ml < high)


def recall_by_size(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray,
                   voxel_ml: float) -> dict[str, tuple[int, int]]:
    """(found, total) ground-truth lesions per size bin; a lesion is found when any predicted voxel touches it."""
    brain = np.asarray(brain, dtype=bool)
    truth = np.asarray(truth, dtype=bool) & brain
    hit = np.asarray(pred, dtype=bool) & brain & truth
    labels, n = label_components(truth)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
    touched = np.bincount(labels[hit], minlength=n + 1)[1:] > 0
    counts = {name: (0, 0) for name, _, _ in SIZE_BINS}
    for size, found in zip(sizes, touched, strict=True):
        name = size_bin(float(size))
        done, total = counts[name]
        counts[name] = (done + int(found), total + 1)
    return counts


class DetectionBreakdown:
    """Healthy-control false positives and lesion recall by size bin of every method, volume by volume."""

    def __init__(self, methods: list[str]) -> None:
        self.controls: dict[str, list[tuple[str, ControlFalsePositives]]] = {m: [] for m in methods}
        self.bins: dict[str, dict[str, tuple[int, int]]] = {m: {name: (0, 0) for name, _, _ in SIZE_BINS}
                                                            for m in methods}

    def add_lesion_volume(self, method: str, pred: np.ndarray, truth: np.ndarray, region: np.ndarray,
                          voxel_ml: float) -> None:
        for name, (found, total) in recall_by_size(pred, truth, region, voxel_ml).items():
            done, seen = self.bins[method][name]
            self.bins[method][name] = (done + found, seen + total)

    def add_control(self, volume_id: str, method: str, pred: np.ndarray, region: np.ndarray, voxel_ml: float) -> None:
        self.controls[method].append((volume_id, control_false_positives(pred, region, voxel_ml)))

    def summary(self, method: str) -> dict[str, Any]:
        """`healthy_controls` (means and medians per healthy volume) and `lesion_recall_by_size` of a method."""
        stats = [c for _, c in self.controls[method]]
        comps = np.array([c.components for c in stats], dtype=np.float64)
        mls = np.array([c.ml for c in stats], dtype=np.float64)
        controls: dict[str, float | int] = {"volumes": len(stats)}
        if stats:
            controls.update(fp_components_per_volume=float(comps.mean()), fp_components_median=float(np.median(comps)),
                            fp_ml_per_volume=float(mls.mean()), fp_ml_median=float(np.median(mls)))
        by_size = {name: {"found": found, "total": total, "recall": found / total if total else float("nan")}
                   for name, (found, total) in self.bins[method].items()}
        return {"healthy_controls": controls, "lesion_recall_by_size": by_size}

    def table(self) -> pa.Table:
        """One row per method and healthy control: method, id, fp_components, fp_ml."""
        rows = [{"method": m, "id": vid, "fp_components": c.components, "fp_ml": c.ml}
                for m, items in self.controls.items() for vid, c in items]
        return pa.Table.from_pylist(rows, schema=CONTROLS_SCHEMA)
