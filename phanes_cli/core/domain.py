"""The calibration domain: how the anomaly map of healthy tissue looked on the calibration volumes.

Thresholds calibrated on some brains hold for brains that score like them. A volume prepared differently
(another intensity normalisation, scanner or field strength) can give a higher stage 1 map everywhere: more
of its healthy brain is inpainted and the inpainting residual is higher, and its lesion burden is then
inflated with confidence. So calibration stores, over its healthy validation volumes, the range of two figures
of healthy tissue, and screening flags a volume (`qc_flags`: `outside_calibration`, with a warning) whose
figures leave that range by more than a factor `MARGIN`:
- `inpainted_fraction`: share of brain voxels with s(x) > 0 (inside the inpainting mask);
- `score_median`: median of s(x) over those voxels.
Both are taken outside the volume's lesion mask (dilated by one voxel, so a lesion's soft border does not
count as healthy tissue): a lesion itself never makes a volume look out of domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

STATISTICS = ("inpainted_fraction", "score_median")
MARGIN = 1.5  # a figure outside [low / MARGIN, high * MARGIN] of the calibration volumes is out of domain


def healthy_tissue_figures(anomaly: np.ndarray, brain: np.ndarray, lesions: np.ndarray) -> dict[str, float]:
    """The two figures of a volume's healthy tissue: brain outside its (one-voxel dilated) lesion mask."""
    healthy = np.asarray(brain, dtype=bool)
    if lesions.any():
        healthy = healthy & ~ndimage.binary_dilation(lesions, structure=np.ones((3, 3, 3), dtype=bool))
    scores = anomaly[healthy]
    positive = scores[scores > 0]
    return {"inpainted_fraction": float(positive.size) / max(int(scores.size), 1),
            "score_median": float(np.median(positive)) if positive.size else 0.0}


def domain_record(figures: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The calibration record's `domain`: each figure's [low, high] over the calibration volumes, and the margin."""
    return {**{name: [min(f[name] for f in figures), max(f[name] for f in figures)] for name in STATISTICS},
            "margin": MARGIN, "n_volumes": len(figures)}


def outside(figures: dict[str, float], domain: dict[str, Any]) -> list[str]:
    """Which figures leave the calibration range by more than its margin (lower or higher)."""
    margin = float(domain["margin"])
    out = []
    for name in STATISTICS:
        low, high = domain[name]
        if figures[name] > high * margin or figures[name] < low / margin:
            out.append(name)
    return out


def check_record(domain: Any) -> str | None:
    """What is wrong with a stored `domain` record, or None when it is valid."""
    if not isinstance(domain, dict):
        return f"must be a JSON object, got {domain!r}"
    unknown = sorted(set(domain) - {*STATISTICS, "margin", "n_volumes"})
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}"
    for name in STATISTICS:
        pair = domain.get(name)
        if not (isinstance(pair, list) and len(pair) == 2 and all(_finite(v) and v >= 0 for v in pair)
                and pair[0] <= pair[1]):
            return f"{name} must be [low, high] with 0 <= low <= high, got {pair!r}"
    if not (_finite(domain.get("margin")) and domain["margin"] >= 1):
        return f"margin must be a finite number >= 1, got {domain.get('margin')!r}"
    count = domain.get("n_volumes", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"n_volumes must be a whole number >= 0, got {count!r}"
    return None


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
