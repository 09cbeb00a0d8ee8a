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
The (p, t, min size) with the best Dice pooled over all lesioned validation volumes wins (ties: the
first, i.e. the lowest percentile, threshold and size). Test volumes are never read.
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


def tune(backend: Backend, cfg: PhanesConfig, healthy: SliceSet, lesioned: Sequence[LesionedVolume],
         batch_size: int = 32, report: Callable[[str], object] = lambda message: None) -> Calibration:
    """Search (mask percentile, anomaly threshold, minimum lesion size) for the best validation Dice."""
    values = stage1_values(backend, healthy.images, healthy.brain, cfg.mask, batch_size, volumes=healthy.volume)
    best: dict[str, Any] = {"dice": -1.0}
    per_percentile: dict[str, float] = {}
    for q in cfg.tune.mask_percentiles:
        mask_threshold = percentile_of(values, q)
        if not np.isfinite(mask_threshold) or mask_threshold <= 0:
            raise PhanesError("tuning: the healthy validation slices give no positive stage 1 map; train longer")
        scores = [run_volume(v.image, v.brain, backend, cfg, mask_threshold, batch_size, keep=()).anomaly
                  for v in lesioned]
        thresholds = candidate_thresholds(scores, cfg.tune.anomaly_candidates)
        if thresholds.size == 0:
            per_percentile[f"{q:g}"] = 0.0
            continue
        grid = dice_grid(scores, lesioned, thresholds, cfg.tune.min_lesion_ml)
        i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
        per_percentile[f"{q:g}"] = float(grid[i, j])
        report(f"mask percentile {q:g}: best validation Dice {grid[i, j]:.3f}")
        if grid[i, j] > best["dice"]:
            best = {"dice": float(grid[i, j]), "q": q, "mask": mask_threshold, "t": float(thresholds[i]),
                    "min_ml": float(cfg.tune.min_lesion_ml[j]), "scores": scores}
    if "q" not in best:
        raise PhanesError("tuning: no mask percentile gave any positive anomaly score on the lesioned validation "
                          "volumes; train longer")
    figures = validation_figures(best["scores"], lesioned, best["t"], best["min_ml"])
    tuning = {"mask_percentile": best["q"], "validation": figures, "dice_by_mask_percentile": per_percentile,
              "lesioned_volumes": [v.id for v in lesioned]}
    return Calibration(mask_threshold=best["mask"], anomaly_threshold=best["t"], n_slices=len(healthy),
                       n_volumes=len({v.id.split("+")[0] for v in lesioned}), min_lesion_ml=best["min_ml"],
                       tuning=tuning)
