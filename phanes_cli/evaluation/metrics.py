"""Streaming lesion-segmentation metrics: pixel AUPRC, best Dice over a threshold sweep, Dice at a fixed
threshold, lesion-wise detection and lesion-volume error, per volume and pooled over a cohort.

A cohort can hold thousands of volumes of ~1e6 brain voxels each, too many to keep every score for an
exact precision-recall curve. Scores are therefore accumulated in fixed-bin histograms, one for voxels
of lesions (positives) and one for the rest (negatives); the curve is read off their cumulative sums.

Approximation: bin k covers scores in [k*w, (k+1)*w) with w = max_score / bins; scores >= max_score
fall into the last bin (counted in `PRHistogram.clipped`). Thresholds are the bin lower edges and a
voxel is predicted positive at threshold k*w when its bin index is >= k (i.e. score >= k*w up to float
rounding at the edge). When no two distinct scores share a bin (e.g. scores already quantised to the
bins) the result equals the exact step-wise curve of scikit-learn; otherwise scores sharing a bin are
treated as ties, which with 65536 bins moves AP and Dice by far less than 1e-3 for typical maps.
Only voxels inside the brain mask are ever counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import pyarrow as pa

from phanes_cli.evaluation.detection import LesionDetection, lesion_detection


class PRHistogram:
    """Histograms of scores of positive and negative voxels on `bins` equal bins over [0, max_score].

    Two accumulators with the same bins and max_score can be merged (parallel workers); the result
    equals one accumulator fed all the data.
    """

    def __init__(self, bins: int = 65536, max_score: float = 1.0) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not (math.isfinite(max_score) and max_score > 0):
            raise ValueError(f"max_score must be a positive finite number, got {max_score}")
        self.bins = int(bins)
        self.max_score = float(max_score)
        self.positives = np.zeros(self.bins, dtype=np.int64)
        self.negatives = np.zeros(self.bins, dtype=np.int64)
        self.clipped = 0

    @property
    def thresholds(self) -> np.ndarray:
        """(bins,) lower bin edges: the thresholds of the sweep."""
        return np.arange(self.bins, dtype=np.float64) * (self.max_score / self.bins)

    @property
    def n_samples(self) -> int:
        """Number of voxels accumulated so far."""
        return int(self.positives.sum() + self.negatives.sum())

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add voxels: scores (any shape, finite, >= 0) and boolean labels of the same shape."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        labels = np.asarray(labels, dtype=bool).ravel()
        if scores.shape != labels.shape:
            raise ValueError(f"{scores.size} scores but {labels.size} labels")
        if scores.size == 0:
            return
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        if scores.min() < 0:
            raise ValueError(f"scores must be non-negative, got minimum {scores.min()}")
        index = np.floor(scores * (self.bins / self.max_score))
        over = index >= self.bins
        self.clipped += int(np.count_nonzero(over))
        index = np.where(over, self.bins - 1, index).astype(np.intp)
        self.positives += np.bincount(index[labels], minlength=self.bins)
        self.negatives += np.bincount(index[~labels], minlength=self.bins)

    def merge(self, other: PRHistogram) -> None:
        """Add another accumulator's counts; both must share bins and max_score."""
        if (other.bins, other.max_score) != (self.bins, self.max_score):
            raise ValueError(
                f"cannot merge histograms with bins/max_score {other.bins}/{other.max_score} "
                f"into {self.bins}/{self.max_score}"
            )
        self.positives += other.positives
        self.negatives += other.negatives
        self.clipped += other.clipped

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """(bins,) true and false positives when predicting score >= threshold k."""
        tp = np.cumsum(self.positives[::-1])[::-1]
        fp = np.cumsum(self.negatives[::-1])[::-1]
        return tp, fp

    def average_precision(self) -> float:
        """Step-wise AP, sum over thresholds of (R_k - R_{k+1}) * P_k as in scikit-learn; NaN without positives."""
        total = int(self.positives.sum())
        if total == 0:
            return float("nan")
        tp, fp = self._cumulative()
        hit = self.positives > 0
        ap = np.sum(self.positives[hit] / total * (tp[hit] / (tp[hit] + fp[hit])))
        return float(min(ap, 1.0))  # rounding of the sum can exceed 1 by an ulp

    def best_dice(self) -> tuple[float, float]:
        """(best Dice over the threshold sweep, its threshold); ties go to the highest threshold.

        NaN, NaN without positives: the best threshold is then undefined.
        """
        total = int(self.positives.sum())
        if total == 0:
            return float("nan"), float("nan")
        tp, fp = self._cumulative()
        dice = 2.0 * tp / (tp + fp + total)
        k = self.bins - 1 - int(np.argmax(dice[::-1]))
        return float(dice[k]), float(self.thresholds[k])


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN); 1.0 when prediction and truth are both empty (nothing missed, nothing wrong)."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def _confusion(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts inside the brain."""
    if not (pred.shape == truth.shape == brain.shape):
        raise ValueError(f"shapes differ: prediction {pred.shape}, truth {truth.shape}, brain {brain.shape}")
    pred = pred.astype(bool, copy=False) & brain
    truth = truth.astype(bool, copy=False) & brain
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def dice(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    """Dice of two binary masks inside the brain (same shape); 1.0 when both are empty there."""
    return _dice_from_counts(*_confusion(np.asarray(pred), np.asarray(truth), np.asarray(brain, dtype=bool)))


@dataclass(frozen=True)
class VolumeScores:
    """Metrics of one volume. auprc, best_dice and best_dice_threshold are NaN without lesion voxels;
    lesion_* ratios are NaN when undefined (see LesionDetection)."""

    id: str
    n_brain_voxels: int
    auprc: float
    best_dice: float
    best_dice_threshold: float
    dice: float
    lesions_gt: int
    lesions_found: int
    pred_components: int
    fp_components: int
    lesion_recall: float
    lesion_precision: float
    lesion_f1: float
    true_ml: float
    predicted_ml: float
    abs_volume_error_ml: float


# VolumeScores as Arrow columns: the one map of its field types (annotations are strings here).
_ARROW_TYPES: dict[str, pa.DataType] = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
VOLUME_SCORES_SCHEMA = pa.schema([(f.name, _ARROW_TYPES[str(f.type)]) for f in fields(VolumeScores)])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) of the non-NaN values; NaN, NaN when there are none."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std())


class CohortMetrics:
    """Accumulate per-volume metrics plus pooled histogram, voxel counts and lesion counts of a cohort.

    Pooled metrics treat the cohort's brain voxels as one set. Per-volume means of auprc, best Dice and
    Dice are over volumes that contain lesion voxels (healthy volumes have no AUPRC, and their Dice of
    1 or 0 would only measure false alarms); the volume error mean is over all volumes.
    """

    def __init__(self, threshold: float, bins: int = 65536, max_score: float = 1.0) -> None:
        self.threshold = float(threshold)
        self.histogram = PRHistogram(bins=bins, max_score=max_score)
        self.volumes: list[VolumeScores] = []
        self.detection = LesionDetection(0, 0, 0, 0)
        self.tp = 0
        self.fp = 0
        self.fn = 0

    def add_volume(
        self,
        id: str,
        score: np.ndarray,
        prediction: np.ndarray | None,
        truth: np.ndarray,
        brain: np.ndarray,
        voxel_ml: float,
    ) -> VolumeScores:
        """Score one volume; arrays share one shape (e.g. (X, Y, Z)). prediction None -> score >= threshold.

        voxel_ml is the voxel volume in mL (prod(zooms) / 1000).
        """
        score = np.asarray(score)
        truth = np.asarray(truth, dtype=bool)
        brain = np.asarray(brain, dtype=bool)
        pred = score >= self.threshold if prediction is None else np.asarray(prediction, dtype=bool)
        if not (score.shape == pred.shape == truth.shape == brain.shape):
            raise ValueError(
                f"volume {id}: shapes differ: score {score.shape}, prediction {pred.shape}, "
                f"truth {truth.shape}, brain {brain.shape}"
            )
        histogram = PRHistogram(bins=self.histogram.bins, max_score=self.histogram.max_score)
        histogram.update(score[brain], truth[brain])
        best, best_threshold = histogram.best_dice()
        tp, fp, fn = _confusion(pred, truth, brain)
        detection = lesion_detection(pred, truth, brain)
        true_ml = (tp + fn) * voxel_ml
        predicted_ml = (tp + fp) * voxel_ml
        result = VolumeScores(
            id=id,
            n_brain_voxels=int(np.count_nonzero(brain)),
            auprc=histogram.average_precision(),
            best_dice=best,
            best_dice_threshold=best_threshold,
            dice=_dice_from_counts(tp, fp, fn),
            lesions_gt=detection.gt_lesions,
            lesions_found=detection.found,
            pred_components=detection.pred_components,
            fp_components=detection.fp_components,
            lesion_recall=detection.recall,
            lesion_precision=detection.precision,
            lesion_f1=detection.f1,
            true_ml=true_ml,
            predicted_ml=predicted_ml,
            abs_volume_error_ml=abs(predicted_ml - true_ml),
        )
        self.histogram.merge(histogram)
        self.detection = self.detection + detection
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.volumes.append(result)
        return result

    def merge(self, other: CohortMetrics) -> None:
        """Append another worker's volumes and pooled counts; both must use one threshold and binning."""
        if other.threshold != self.threshold:
            raise ValueError(f"cannot merge cohorts scored at thresholds {other.threshold} and {self.threshold}")
        self.histogram.merge(other.histogram)
        self.volumes.extend(other.volumes)
        self.detection = self.detection + other.detection
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def summary(self) -> dict[str, float]:
        """Pooled and per-volume (mean, std) metrics of the cohort so far."""
        with_lesions = [v for v in self.volumes if v.true_ml > 0]
        best, best_threshold = self.histogram.best_dice()
        out: dict[str, float] = {
            "n_volumes": len(self.volumes),
            "n_volumes_with_lesions": len(with_lesions),
            "threshold": self.threshold,
            "auprc": self.histogram.average_precision(),
            "best_dice": best,
            "best_dice_threshold": best_threshold,
            "dice": _dice_from_counts(self.tp, self.fp, self.fn),
            "clipped_fraction": self.histogram.clipped / max(self.histogram.n_samples, 1),
        }
        for name in ("auprc", "best_dice", "dice"):
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std([getattr(v, name) for v in with_lesions])
        errors = [v.abs_volume_error_ml for v in self.volumes]
        out["abs_volume_error_ml_mean"], out["abs_volume_error_ml_std"] = mean_std(errors)
        out["abs_volume_error_ml_median"] = float(np.nanmedian(errors)) if errors else float("nan")
        out.update(
            lesions_gt=self.detection.gt_lesions,
            lesions_found=self.detection.found,
            pred_components=self.detection.pred_components,
            fp_components=self.detection.fp_components,
            lesion_recall=self.detection.recall,
            lesion_precision=self.detection.precision,
            lesion_f1=self.detection.f1,
        )
        return out

    def per_volume_table(self) -> pa.Table:
        """One row per volume in the order added, columns as in VolumeScores."""
        return pa.Table.from_pylist([asdict(v) for v in self.volumes], schema=VOLUME_SCORES_SCHEMA)
