"""The lesion rule: how an anomaly map s(x) becomes a binary lesion mask. Written once, here.

A voxel is a lesion candidate when s(x) >= the anomaly threshold and s(x) > 0 (s is exactly 0 outside the
inpainting mask, which must never count as a lesion, whatever the threshold) and it lies inside the brain.
Connected candidates (full connectivity, `core.components`) smaller than the minimum size are then dropped:
most components a small model finds are a voxel or two. Screening, `phanes stats`, evaluation, calibration
and tuning all apply this object; the threshold and size come from the bundle's calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.components import label_components


@dataclass(frozen=True)
class LesionRule:
    """s >= threshold where s > 0, inside the brain; then components under `min_ml` millilitres dropped."""

    threshold: float
    min_ml: float = 0.0

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> LesionRule:
        return cls(threshold=calibration.anomaly_threshold, min_ml=calibration.min_lesion_ml)

    def candidates(self, score: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """The threshold part alone (bool, any shape): what a 2D slice or a size sweep starts from."""
        return (score >= self.threshold) & (score > 0) & np.asarray(brain, dtype=bool)

    def keeps(self, sizes_ml: np.ndarray) -> np.ndarray:
        """Which components of these sizes (mL) the rule keeps."""
        return np.asarray(sizes_ml) >= self.min_ml

    def apply(self, score: np.ndarray, brain: np.ndarray, voxel_ml: float) -> np.ndarray:
        """The lesion mask of a volume-grid map (X, Y, Z): candidates, then components under `min_ml` dropped."""
        mask = self.candidates(score, brain)
        if self.min_ml <= 0 or not mask.any():
            return mask
        labels, n = label_components(mask)
        keep = self.keeps(np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml)
        keep[0] = False
        return keep[labels]
