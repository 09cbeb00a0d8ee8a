"""Lesion-wise detection: which ground-truth lesions a prediction touches, which predicted components are false.

Components come from `core.components.label_components` (full connectivity), as every lesion count does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phanes_cli.core.components import label_components


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection counts of one volume (or a cohort, by summing counts).

    A ground-truth lesion is found when any predicted voxel touches it. A predicted component is a true
    positive when it overlaps any ground-truth lesion, else a false positive. Precision counts predicted
    components (not found lesions) so that numerator and denominator share a unit even when one
    predicted blob covers several lesions.
    """

    gt_lesions: int
    found: int
    pred_components: int
    fp_components: int

    @property
    def recall(self) -> float:
        """found / gt_lesions; NaN when there is no ground-truth lesion."""
        return self.found / self.gt_lesions if self.gt_lesions else float("nan")

    @property
    def precision(self) -> float:
        """Overlapping predicted components / all predicted components; NaN when nothing is predicted."""
        if not self.pred_components:
            return float("nan")
        return (self.pred_components - self.fp_components) / self.pred_components

    @property
    def f1(self) -> float:
        """Harmonic mean of lesion recall and precision; NaN when either is undefined, 0 when both are 0."""
        r, p = self.recall, self.precision
        if np.isnan(r) or np.isnan(p):
            return float("nan")
        return 0.0 if r + p == 0 else 2 * r * p / (r + p)

    def __add__(self, other: LesionDetection) -> LesionDetection:
        return LesionDetection(
            self.gt_lesions + other.gt_lesions,
            self.found + other.found,
            self.pred_components + other.pred_components,
            self.fp_components + other.fp_components,
        )


def lesion_detection(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> LesionDetection:
    """Match predicted and ground-truth components inside the brain (arrays of one shape, any ndim)."""
    brain = np.asarray(brain, dtype=bool)
    pred = np.asarray(pred, dtype=bool) & brain
    truth = np.asarray(truth, dtype=bool) & brain
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    gt_labels, n_gt = label_components(truth)
    pred_labels, n_pred = label_components(pred)
    overlap = pred & truth
    found = int(np.count_nonzero(np.bincount(gt_labels[overlap], minlength=n_gt + 1)[1:]))
    hit_pred = int(np.count_nonzero(np.bincount(pred_labels[overlap], minlength=n_pred + 1)[1:]))
    return LesionDetection(gt_lesions=n_gt, found=found, pred_components=n_pred, fp_components=n_pred - hit_pred)
