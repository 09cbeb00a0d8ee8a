"""`phanes calibrate --tune`: the operating point chosen by Dice on validation volumes with real lesions.

The healthy 99th percentiles of the paper say nothing about lesions: with a small model they leave the
inpainting mask missing most of them, and hand-picking another percentile by looking at test results
leaks the test set into the model. Tuning instead inserts real stroke shapes (the shipped bank, see
`synth.lesion_bank`) into the healthy *validation* volumes (`TuneConfig.copies` lesioned versions of each,
with `TuneConfig.shapes_per_volume` different real masks in each version) and searches:
- the inpainting-mask percentile p (of m(x) over the healthy validation brain pixels, the calibration
  rule of `core.percentiles`), one full pipeline pass per p;
- the anomaly threshold t, among quantiles of s(x) > 0 over the lesioned volumes;
- the minimum lesion size (mL): predicted components smaller than it are dropped
  (the lesion rule, `core.lesion_rule`, that screening and evaluation apply too).
Cost: one `run_volume` per validation volume, copy and percentile (10-25 s each for the CPU model on a
1.5 mm volume); the Dice search over thresholds and sizes is cheap in comparison.
Healthy brains must stay clean: the same healthy validation volumes, without lesions, run through the pipeline
at every p too, and a (p, t, min size) is admissible only when the median over them of the false-positive lesion
volume (every lesion voxel of a healthy volume is false) is at most `tune.healthy_fp_budget_ml` (mL per volume)
and the median number of false components at most `tune.healthy_fp_budget_components`.
The admissible point with the best Dice pooled over all lesioned validation volumes wins (ties: the first, i.e.
the lowest percentile, threshold and size); when no point is admissible, the one with the least healthy false
positive volume, recorded as `budget_met: false`. Stored in `calibration.tuning`: the choice, lesion Dice,
precision, recall, burden error per lesioned volume (predicted minus true mL) and its median absolute value,
the healthy volumes' false-positive mL and components at the chosen point, and the budget. Cost: the healthy
pass adds one `run_volume` per healthy validation volume and percentile. Test volumes are never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from phanes_cli.calibrate.insertion import LesionedVolume
from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.components import label_components
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.percentiles import percentile_of, stage1_values
from phanes_cli.core.pipeline import run_volume
from phanes_cli.errors import PhanesError
from phanes_cli.evaluation.detection import lesion_detection
from phanes_cli.training.data import SliceSet


def dice_grid(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume], thresholds: np.ndarray,
              min_ml: Sequence[float]) -> np.ndarray:
    """Pooled Dice (T, M) of `s >= t`, components under each minimum size dropped, over all volumes."""
    tp = np.zeros((len(thresholds), len(min_ml)))
    predicted = np.zeros_like(tp)
    truth_total = 0
    for score, volume in zip(scores, volumes, strict=True):
        truth_total += int(volume.truth.sum())
        for i, t in enumerate(thresholds):
            labels, n = label_components(LesionRule(t).candidates(score, volume.brain))
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            overlap = np.bincount(labels[volume.truth], minlength=n + 1)[1:]
            for j, m in enumerate(min_ml):
                keep = LesionRule(t, m).keeps(sizes * volume.voxel_ml)
                tp[i, j] += overlap[keep].sum()
                predicted[i, j] += sizes[keep].sum()
    total = predicted + truth_total
    return np.where(total > 0, 2.0 * tp / np.maximum(total, 1), 0.0)


def candidate_thresholds(scores: Sequence[np.ndarray], count: int) -> np.ndarray:
    """`count` quantiles of s(x) > 0 over all volumes, denser toward the top (where lesion masks live)."""
    positive = np.concatenate([s[s > 0] for s in scores])
    if positive.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(positive, 1.0 - np.geomspace(0.5, 1e-4, count)))


def validation_figures(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume], threshold: float,
                       min_ml: float) -> dict[str, float | int]:
    """Figures of the chosen operating point on the lesioned validation volumes."""
    tp = predicted = truth_total = fp = found = lesions = 0
    for score, volume in zip(scores, volumes, strict=True):
        pred = LesionRule(threshold, min_ml).apply(score, volume.brain, volume.voxel_ml)
        detection = lesion_detection(pred, volume.truth, volume.brain)
        tp += int((pred & volume.truth).sum())
        predicted += int(pred.sum())
        truth_total += int(volume.truth.sum())
        fp += detection.fp_components
        found += detection.found
        lesions += detection.gt_lesions
    return {"dice": 2.0 * tp / max(predicted + truth_total, 1), "precision": tp / predicted if predicted else 0.0,
            "recall": tp / max(truth_total, 1), "lesion_recall": found / max(lesions, 1),
            "fp_components_per_volume": fp / max(len(volumes), 1), "volumes": len(volumes), "lesions": lesions}


def healthy_fp(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume], thresholds: np.ndarray,
               min_ml: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False positives of healthy volumes: (V, T, M) lesion mL and components kept at each threshold and size."""
    ml = np.zeros((len(volumes), len(thresholds), len(min_ml)))
    count = np.zeros_like(ml)
    for v, (score, volume) in enumerate(zip(scores, volumes, strict=True)):
        for i, t in enumerate(thresholds):
            labels, n = label_components(LesionRule(t).candidates(score, volume.brain))
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * volume.voxel_ml
            for j, m in enumerate(min_ml):
                keep = LesionRule(t, m).keeps(sizes)
                ml[v, i, j], count[v, i, j] = sizes[keep].sum(), keep.sum()
    return ml, count


def within_budget(dice: np.ndarray, fp_ml: np.ndarray, budget_ml: float, fp_count: np.ndarray | None = None,
                  budget_count: float = float("inf")) -> tuple[int, int, bool]:
    """(i, j, met): the best Dice among (threshold, size) points whose median healthy false-positive mL and (with
    `fp_count`) median false-positive components are within their budgets (the first on ties); when none is, the
    point with the least false positive volume (then best Dice)."""
    median = np.median(fp_ml, axis=0) if fp_ml.shape[0] else np.zeros_like(dice)
    feasible = median <= budget_ml
    if fp_count is not None and fp_count.shape[0]:
        feasible &= np.median(fp_count, axis=0) <= budget_count
    if feasible.any():
        i, j = np.unravel_index(int(np.argmax(np.where(feasible, dice, -1.0))), dice.shape)
        return int(i), int(j), True
    order = np.lexsort((-dice.ravel(), median.ravel()))
    i, j = np.unravel_index(int(order[0]), dice.shape)
    return int(i), int(j), False


def burden_errors(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume], threshold: float,
                  min_ml: float) -> list[float]:
    """Predicted minus true lesion volume (mL) of each volume at one operating point."""
    rule = LesionRule(threshold, min_ml)
    return [(float(rule.apply(s, v.brain, v.voxel_ml).sum()) - float(v.truth.sum())) * v.voxel_ml
            for s, v in zip(scores, volumes, strict=True)]


def _search(backend: Backend, cfg: PhanesConfig, mask_threshold: float, lesioned: Sequence[LesionedVolume],
            healthy: Sequence[LesionedVolume], batch_size: int) -> dict[str, Any]:
    """One mask threshold: every volume through the pipeline, then the budgeted best (threshold, size)."""
    scores = [run_volume(v.image, v.brain, v.zooms, backend, cfg, mask_threshold, batch_size, keep=()).anomaly
              for v in lesioned]
    clean = [run_volume(v.image, v.brain, v.zooms, backend, cfg, mask_threshold, batch_size, keep=()).anomaly
             for v in healthy]
    thresholds = candidate_thresholds(scores + clean, cfg.tune.anomaly_candidates)
    if thresholds.size == 0:
        return {}
    grid = dice_grid(scores, lesioned, thresholds, cfg.tune.min_lesion_ml)
    fp_ml, fp_count = healthy_fp(clean, healthy, thresholds, cfg.tune.min_lesion_ml)
    i, j, met = within_budget(grid, fp_ml, cfg.tune.healthy_fp_budget_ml, fp_count,
                              cfg.tune.healthy_fp_budget_components)
    median = float(np.median(fp_ml[:, i, j])) if len(healthy) else 0.0
    return {"dice": float(grid[i, j]), "met": met, "median_fp_ml": median, "mask": mask_threshold,
            "t": float(thresholds[i]), "min_ml": float(cfg.tune.min_lesion_ml[j]), "scores": scores,
            "fp_ml": fp_ml[:, i, j].tolist(), "fp_components": fp_count[:, i, j].astype(int).tolist()}


def _percentile_line(q: float, found: dict[str, Any], cfg: PhanesConfig) -> str:
    """What one mask percentile gave: its best Dice and that point's healthy false positives against the budgets."""
    if not found:
        return f"mask percentile {q:g}: no positive anomaly score on the validation volumes"
    components = float(np.median(found["fp_components"])) if found["fp_components"] else 0.0
    verdict = "within" if found["met"] else "over"
    return (f"mask percentile {q:g}: Dice {found['dice']:.3f}, healthy false positives {found['median_fp_ml']:.1f} mL "
            f"and {components:g} component(s) per volume, {verdict} the budgets ({cfg.tune.healthy_fp_budget_ml:g} mL, "
            f"{cfg.tune.healthy_fp_budget_components:g})")


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Within budget beats over budget; then higher Dice (within) or less healthy false positive volume (over)."""
    if a["met"] != b["met"]:
        return bool(a["met"])
    return a["dice"] > b["dice"] if a["met"] else a["median_fp_ml"] < b["median_fp_ml"]


def tune(backend: Backend, cfg: PhanesConfig, healthy: SliceSet, lesioned: Sequence[LesionedVolume],
         batch_size: int = 32, report: Callable[[str], object] = lambda message: None,
         clean: Sequence[LesionedVolume] = ()) -> Calibration:
    """Search (mask percentile, anomaly threshold, minimum lesion size) for the best validation Dice whose median
    false positive volume on the healthy validation volumes `clean` stays within `tune.healthy_fp_budget_ml`.

    Returns the Calibration of the choice; its `tuning` holds the chosen mask percentile, the validation figures
    of the choice, the healthy false positives, the best Dice per mask percentile and the lesioned volumes' ids.
    `report` gets one line per mask percentile, as it finishes (a progress bar advances on it).
    """
    values = stage1_values(backend, healthy.images, healthy.brain, cfg.mask, batch_size, volumes=healthy.volume)
    best: dict[str, Any] = {}
    per_percentile: dict[str, float | None] = {}
    for q in cfg.tune.mask_percentiles:
        mask_threshold = percentile_of(values, q)
        if not np.isfinite(mask_threshold) or mask_threshold <= 0:
            raise PhanesError("tuning: the healthy validation slices give no positive stage 1 map; train longer")
        found = _search(backend, cfg, mask_threshold, lesioned, clean, batch_size)
        per_percentile[f"{q:g}"] = found["dice"] if found.get("met") else None
        report(_percentile_line(q, found, cfg))
        if not found:
            continue
        if not best or _better(found, best):
            best = {**found, "q": q}
    if not best:
        raise PhanesError("tuning: no mask percentile gave any positive anomaly score on the validation volumes; "
                          "train longer")
    return _tuned_calibration(cfg, healthy, lesioned, clean, best, per_percentile)


def _tuned_calibration(cfg: PhanesConfig, healthy: SliceSet, lesioned: Sequence[LesionedVolume],
                       clean: Sequence[LesionedVolume], best: dict[str, Any],
                       per_percentile: dict[str, float | None]) -> Calibration:
    """The chosen point with its figures: lesion Dice and burden error, healthy false positives per volume."""
    errors = burden_errors(best["scores"], lesioned, best["t"], best["min_ml"])
    figures: dict[str, Any] = {**validation_figures(best["scores"], lesioned, best["t"], best["min_ml"]),
                               "burden_error_ml": errors,
                               "median_abs_burden_error_ml": float(np.median(np.abs(errors))) if errors else 0.0}
    tuning = {"mask_percentile": best["q"], "validation": figures, "dice_by_mask_percentile": per_percentile,
              "lesioned_volumes": [v.id for v in lesioned],
              "healthy_fp_budget_ml": cfg.tune.healthy_fp_budget_ml,
              "healthy_fp_budget_components": cfg.tune.healthy_fp_budget_components, "budget_met": best["met"],
              "healthy_validation": {"volumes": [v.id for v in clean], "fp_ml": best["fp_ml"],
                                     "fp_components": best["fp_components"],
                                     "median_fp_ml": best["median_fp_ml"],
                                     "median_fp_components": float(np.median(best["fp_components"]))
                                     if clean else 0.0}}
    return Calibration(mask_threshold=best["mask"], anomaly_threshold=best["t"], n_slices=len(healthy),
                       n_volumes=len({v.id.split("+")[0] for v in lesioned}), min_lesion_ml=best["min_ml"],
                       tuning=tuning)
