"""Streaming evaluation metrics checked against scikit-learn and against hand-built masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from phanes_cli.evaluation import (
    CohortMetrics,
    LesionDetection,
    PRHistogram,
    dice,
    label_components,
    lesion_detection,
    lesion_table,
)


def _sklearn_best_dice(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 (= Dice) over scikit-learn's exact curve and the score threshold achieving it."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    k = int(np.argmax(f1))
    return float(f1[k]), float(thresholds[k])


def _noisy_task(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~10% positives and scores in [0, 1) that rank positives higher on average."""
    labels = rng.random(n) < 0.1
    scores = np.clip(rng.normal(0.3 + 0.25 * labels, 0.15), 0.0, 0.999)
    return scores, labels


def test_average_precision_equals_sklearn_on_scores_quantised_to_bins() -> None:
    rng = np.random.default_rng(0)
    bins, max_score = 256, 0.3
    width = max_score / bins
    labels = rng.random(5000) < 0.2
    k = np.clip(rng.normal(100 + 40 * labels, 30), 0, bins - 1).astype(int)
    scores = (k + 0.5) * width
    hist = PRHistogram(bins=bins, max_score=max_score)
    hist.update(scores, labels)
    assert hist.clipped == 0
    assert abs(hist.average_precision() - average_precision_score(labels, scores)) < 1e-3
    # Bins separate every distinct score, so the histogram curve is the exact one.
    assert hist.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_average_precision_close_to_sklearn_on_continuous_scores() -> None:
    rng = np.random.default_rng(1)
    scores, labels = _noisy_task(rng, 40000)
    hist = PRHistogram(bins=65536, max_score=1.0)
    hist.update(scores, labels)
    assert abs(hist.average_precision() - average_precision_score(labels, scores)) < 5e-3
    coarse = PRHistogram(bins=4096, max_score=1.0)
    coarse.update(scores, labels)
    assert abs(coarse.average_precision() - average_precision_score(labels, scores)) < 5e-3


def test_best_dice_equals_sklearn_sweep_on_quantised_scores() -> None:
    rng = np.random.default_rng(2)
    bins, max_score = 512, 2.0
    width = max_score / bins
    labels = rng.random(8000) < 0.15
    k = np.clip(rng.normal(200 + 60 * labels, 50), 0, bins - 1).astype(int)
    scores = (k + 0.5) * width
    hist = PRHistogram(bins=bins, max_score=max_score)
    hist.update(scores, labels)
    best, threshold = hist.best_dice()
    expected, expected_threshold = _sklearn_best_dice(labels, scores)
    assert best == pytest.approx(expected, abs=1e-12)
    # The histogram threshold is the lower edge of the bin holding sklearn's threshold score.
    assert threshold == pytest.approx(math.floor(expected_threshold / width) * width, abs=1e-12)
    predicted = scores >= threshold
    assert dice(predicted, labels, np.ones_like(labels)) == pytest.approx(best, abs=1e-12)


def test_best_dice_close_to_sklearn_on_continuous_scores() -> None:
    rng = np.random.default_rng(3)
    scores, labels = _noisy_task(rng, 40000)
    hist = PRHistogram()
    hist.update(scores, labels)
    best, threshold = hist.best_dice()
    expected, expected_threshold = _sklearn_best_dice(labels, scores)
    assert abs(best - expected) < 5e-3
    assert abs(threshold - expected_threshold) < 0.02


def test_merge_equals_one_accumulator_over_the_union() -> None:
    rng = np.random.default_rng(4)
    scores, labels = _noisy_task(rng, 10000)
    whole = PRHistogram(bins=1024)
    whole.update(scores, labels)
    first, second = PRHistogram(bins=1024), PRHistogram(bins=1024)
    first.update(scores[:3000], labels[:3000])
    second.update(scores[3000:], labels[3000:])
    first.merge(second)
    np.testing.assert_array_equal(first.positives, whole.positives)
    np.testing.assert_array_equal(first.negatives, whole.negatives)
    assert first.average_precision() == whole.average_precision()
    assert first.best_dice() == whole.best_dice()
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(PRHistogram(bins=512))


def test_perfect_predictor_scores_one() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = np.where(labels, 0.8, 0.1)
    hist = PRHistogram(bins=100, max_score=1.0)
    hist.update(scores, labels)
    assert hist.average_precision() == pytest.approx(1.0)
    best, threshold = hist.best_dice()
    assert best == pytest.approx(1.0)
    assert 0.1 < threshold <= 0.8


def test_histogram_without_positives_is_undefined() -> None:
    hist = PRHistogram(bins=10)
    hist.update(np.array([0.1, 0.5]), np.array([False, False]))
    assert math.isnan(hist.average_precision())
    assert all(math.isnan(v) for v in hist.best_dice())


def test_scores_above_max_are_clipped_into_last_bin_and_counted() -> None:
    hist = PRHistogram(bins=4, max_score=1.0)
    hist.update(np.array([0.1, 0.99, 1.0, 7.0]), np.array([False, True, True, False]))
    assert hist.clipped == 2
    np.testing.assert_array_equal(hist.positives, [0, 0, 0, 2])
    np.testing.assert_array_equal(hist.negatives, [1, 0, 0, 1])


def test_invalid_scores_are_rejected() -> None:
    hist = PRHistogram(bins=4)
    with pytest.raises(ValueError, match="non-negative"):
        hist.update(np.array([-0.1, 0.2]), np.array([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        hist.update(np.array([np.nan, 0.2]), np.array([True, False]))
    with pytest.raises(ValueError, match="labels"):
        hist.update(np.array([0.1, 0.2]), np.array([True]))


def test_dice_known_values() -> None:
    brain = np.ones(4, dtype=bool)
    # TP 1, FP 1, FN 1 -> 2 / 4
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]), brain) == pytest.approx(0.5)
    # TP 2, FP 0, FN 1 -> 4 / 5
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 1, 1, 0]), brain) == pytest.approx(0.8)
    assert dice(np.zeros(4), np.zeros(4), brain) == 1.0
    assert dice(np.zeros(4), np.array([0, 1, 0, 0]), brain) == 0.0
    # The false positive outside the brain does not count: TP 1, FP 0, FN 1 -> 2 / 3.
    outside = np.array([True, True, True, False])
    assert dice(np.array([1, 0, 0, 1]), np.array([1, 1, 0, 0]), outside) == pytest.approx(2 / 3)


def _blob(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    """Boolean box with inclusive corners lo..hi."""
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    return mask


def test_components_use_26_connectivity() -> None:
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner contact only
    mask[3, 3, 3] = True
    labels, n = label_components(mask)
    assert n == 2
    assert labels[0, 0, 0] == labels[1, 1, 1] != labels[3, 3, 3]


def test_lesion_detection_counts_found_and_false_positive_components() -> None:
    shape = (20, 20, 20)
    truth = _blob(shape, (2, 2, 2), (4, 4, 4)) | _blob(shape, (12, 12, 12), (14, 14, 14))
    pred = _blob(shape, (4, 4, 4), (6, 6, 6)) | _blob(shape, (2, 14, 2), (3, 16, 3))
    brain = np.ones(shape, dtype=bool)
    result = lesion_detection(pred, truth, brain)
    assert result == LesionDetection(gt_lesions=2, found=1, pred_components=2, fp_components=1)
    assert result.recall == pytest.approx(0.5)
    assert result.precision == pytest.approx(0.5)
    assert result.f1 == pytest.approx(0.5)
    # Excluding the false-positive blob from the brain removes it from the count.
    brain[0:5, 13:18, 0:5] = False
    assert lesion_detection(pred, truth, brain) == LesionDetection(2, 1, 1, 0)


def test_lesion_detection_undefined_ratios_are_nan() -> None:
    empty = LesionDetection(0, 0, 0, 0)
    assert math.isnan(empty.recall) and math.isnan(empty.precision) and math.isnan(empty.f1)
    missed = LesionDetection(gt_lesions=3, found=0, pred_components=2, fp_components=2)
    assert missed.recall == 0.0 and missed.precision == 0.0 and missed.f1 == 0.0


def test_lesion_table_with_anisotropic_affine() -> None:
    shape = (10, 12, 8)
    big = _blob(shape, (1, 2, 3), (3, 3, 5))  # 3 x 2 x 3 = 18 voxels
    small = _blob(shape, (7, 8, 0), (7, 9, 0))  # 1 x 2 x 1 = 2 voxels
    twin = _blob(shape, (7, 0, 6), (7, 1, 6))  # same size as `small`, bbox_min (7, 0, 6) sorts first
    mask = big | small | twin
    score = np.zeros(shape)
    score[big] = 0.5
    score[2, 2, 4] = 0.9
    score[small] = [0.2, 0.4]
    zooms = (1.0, 1.5, 3.0)
    # Flip x, scale by the zooms, translate: world = (-1.0*i + 50, 1.5*j - 20, 3.0*k + 7).
    affine = np.array([[-1.0, 0, 0, 50.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1.0]])
    rows = lesion_table(mask, score, affine, zooms, axial_axis=2)

    assert [r["lesion_index"] for r in rows] == [1, 2, 3]
    assert [r["voxel_count"] for r in rows] == [18, 2, 2]
    voxel_ml = 1.0 * 1.5 * 3.0 / 1000
    assert rows[0]["volume_ml"] == pytest.approx(18 * voxel_ml)

    first = rows[0]
    assert first["centroid_voxel"] == pytest.approx((2.0, 2.5, 4.0))
    assert first["centroid_world_mm"] == pytest.approx((-2.0 + 50, 1.5 * 2.5 - 20, 3.0 * 4.0 + 7))
    assert first["bbox_min"] == (1, 2, 3) and first["bbox_max"] == (3, 3, 5)
    assert (first["slice_min"], first["slice_max"]) == (3, 5)
    assert first["mean_score"] == pytest.approx((17 * 0.5 + 0.9) / 18)
    assert first["max_score"] == pytest.approx(0.9)

    second, third = rows[1], rows[2]
    assert second["bbox_min"] == (7, 0, 6) and second["bbox_max"] == (7, 1, 6)
    assert second["max_score"] == 0.0
    assert third["centroid_voxel"] == pytest.approx((7.0, 8.5, 0.0))
    assert third["centroid_world_mm"] == pytest.approx((43.0, 1.5 * 8.5 - 20, 7.0))
    assert third["mean_score"] == pytest.approx(0.3) and third["max_score"] == pytest.approx(0.4)
    assert (third["slice_min"], third["slice_max"]) == (0, 0)

    along_x = lesion_table(mask, None, affine, zooms, axial_axis=0)
    assert (along_x[0]["slice_min"], along_x[0]["slice_max"]) == (1, 3)
    assert along_x[0]["mean_score"] is None and along_x[0]["max_score"] is None
    assert lesion_table(np.zeros(shape, dtype=bool), None, affine, zooms) == []


def _volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic (score, truth, brain) triple: a box lesion, noisy scores higher inside it."""
    brain = np.zeros(shape, dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    lo = rng.integers(1, 4, size=3)
    size = rng.integers(1, 4, size=3)
    truth = _blob(shape, tuple(lo), tuple(lo + size))
    score = np.clip(rng.normal(0.2 + 0.3 * truth, 0.1), 0, None)
    return score, truth, brain


def test_streaming_over_volumes_equals_concatenated_computation() -> None:
    rng = np.random.default_rng(5)
    shape = (9, 9, 6)
    threshold = 0.35
    cohort = CohortMetrics(threshold=threshold, bins=65536, max_score=1.0)
    scores, truths, brains = [], [], []
    for i in range(25):
        score, truth, brain = _volume(rng, shape)
        cohort.add_volume(f"v{i}", score, None, truth, brain, voxel_ml=0.001)
        scores.append(score[brain])
        truths.append(truth[brain])
        brains.append(brain)
    all_scores, all_truth = np.concatenate(scores), np.concatenate(truths)
    single = PRHistogram(bins=65536, max_score=1.0)
    single.update(all_scores, all_truth)

    summary = cohort.summary()
    assert summary["n_volumes"] == 25
    assert summary["auprc"] == single.average_precision()
    assert (summary["best_dice"], summary["best_dice_threshold"]) == single.best_dice()
    assert abs(summary["auprc"] - average_precision_score(all_truth, all_scores)) < 5e-3
    pooled_dice = dice(all_scores >= threshold, all_truth, np.ones_like(all_truth))
    assert summary["dice"] == pytest.approx(pooled_dice)

    per_volume_ap = [average_precision_score(t, s) for s, t in zip(scores, truths, strict=True)]
    assert summary["auprc_mean"] == pytest.approx(np.mean(per_volume_ap), abs=5e-3)
    assert summary["auprc_std"] == pytest.approx(np.std(per_volume_ap), abs=5e-3)
    per_volume_dice = [dice(s >= threshold, t, np.ones_like(t)) for s, t in zip(scores, truths, strict=True)]
    assert summary["dice_mean"] == pytest.approx(np.mean(per_volume_dice))

    table = cohort.per_volume_table()
    assert table.num_rows == 25
    assert table.column("id").to_pylist() == [f"v{i}" for i in range(25)]
    assert table.column("dice").to_pylist() == pytest.approx(per_volume_dice)
    assert sum(table.column("lesions_gt").to_pylist()) == summary["lesions_gt"]
    assert summary["lesions_gt"] == 25  # one box lesion per volume


def test_cohort_merge_equals_one_cohort() -> None:
    rng = np.random.default_rng(6)
    volumes = [_volume(rng, (8, 8, 6)) for _ in range(6)]
    whole, first, second = (CohortMetrics(0.3, bins=4096) for _ in range(3))
    for i, (score, truth, brain) in enumerate(volumes):
        whole.add_volume(str(i), score, None, truth, brain, voxel_ml=0.002)
        (first if i < 4 else second).add_volume(str(i), score, None, truth, brain, voxel_ml=0.002)
    first.merge(second)
    assert first.summary() == pytest.approx(whole.summary(), nan_ok=True)
    assert first.per_volume_table().equals(whole.per_volume_table())


def test_score_outside_brain_changes_nothing() -> None:
    rng = np.random.default_rng(7)
    score, truth, brain = _volume(rng, (9, 9, 6))
    base = CohortMetrics(threshold=0.35).add_volume("a", score, None, truth, brain, voxel_ml=0.001)
    noisy_score = score.copy()
    noisy_score[~brain] = 50.0
    noisy_truth = truth.copy()
    noisy_truth[0, 0, 0] = True  # a "lesion" outside the brain
    noisy = CohortMetrics(threshold=0.35).add_volume("a", noisy_score, None, noisy_truth, brain, voxel_ml=0.001)
    assert noisy == base


def test_volume_error_and_given_prediction() -> None:
    shape = (10, 10, 10)
    brain = np.ones(shape, dtype=bool)
    truth = _blob(shape, (2, 2, 2), (3, 3, 3))  # 8 voxels
    pred = _blob(shape, (2, 2, 2), (2, 3, 3)) | _blob(shape, (7, 7, 7), (8, 8, 8))  # 4 + 8 voxels, 4 hit
    score = truth.astype(float) * 0.9
    cohort = CohortMetrics(threshold=0.5)
    result = cohort.add_volume("x", score, pred, truth, brain, voxel_ml=0.5)
    assert result.true_ml == pytest.approx(4.0)
    assert result.predicted_ml == pytest.approx(6.0)
    assert result.abs_volume_error_ml == pytest.approx(2.0)
    assert result.dice == pytest.approx(2 * 4 / (12 + 8))
    assert (result.lesions_gt, result.lesions_found, result.pred_components, result.fp_components) == (1, 1, 2, 1)
    assert result.auprc == pytest.approx(1.0) and result.best_dice == pytest.approx(1.0)
    # Healthy volume: no AUPRC, excluded from per-volume Dice means, included in the volume error.
    healthy = cohort.add_volume("h", np.zeros(shape), None, np.zeros(shape, bool), brain, voxel_ml=0.5)
    assert math.isnan(healthy.auprc) and healthy.dice == 1.0
    summary = cohort.summary()
    assert summary["n_volumes_with_lesions"] == 1
    assert summary["dice_mean"] == pytest.approx(result.dice)
    assert summary["abs_volume_error_ml_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cohort.add_volume("bad", score, None, truth[:5], brain, voxel_ml=0.5)
