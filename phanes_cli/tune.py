"""`phanes calibrate --tune`: the operating point chosen by Dice on validation volumes with real lesions.

The healthy 99th percentiles of the paper say nothing about lesions: with a small model they leave the
inpainting mask missing most of them, and hand-picking another percentile by looking at test results
leaks the test set into the model. Tuning instead inserts real stroke shapes (the shipped bank, see
`synth.shapes`) into the healthy *validation* volumes (`TuneConfig.copies` lesioned versions of each,
with `TuneConfig.shapes_per_volume` different real masks in each version) and searches:
- the inpainting-mask percentile p (of m(x) over the healthy validation brain pixels, the calibration
  rule of `calibrate.stage1_percentile`), one full pipeline pass per p;
- the anomaly threshold t, among quantiles of s(x) > 0 over the lesioned volumes;
- the minimum lesion size (mL): predicted components smaller than it are dropped
  (`pipeline.drop_small_lesions`, the rule screening and evaluation apply too).
Cost: one `run_volume` per validation volume, copy and percentile (10-25 s each for the CPU model on a
1.5 mm volume); the Dice search over thresholds and sizes is cheap in comparison.
The (p, t, min size) with the best Dice pooled over all lesioned validation volumes wins (ties: the
first, i.e. the lowest percentile, threshold and size). Test volumes are never read.

Lesion insertion works on any validation volume: intensities are normalised to white matter, the brain's
bounding box is fitted to the MNI brain's box (the lesion masks are in MNI space), and the lesion is
blended in exactly as `synth.lesions` does for synthetic subjects, plus noise at the level estimated
from the volume so the lesion is not smoother than the tissue around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phanes_cli.backends import Backend
from phanes_cli.calibrate import percentile_of, stage1_values
from phanes_cli.config import PhanesConfig
from phanes_cli.errors import PhanesError
from phanes_cli.evaluation.lesions import label_components, lesion_detection
from phanes_cli.manifest import ManifestRow
from phanes_cli.pipeline import Calibration, drop_small_lesions, run_volume
from phanes_cli.preprocess import load_with_brain
from phanes_cli.synth.lesions import LesionConfig, stroke_lesions
from phanes_cli.synth.shapes import ShapeBank
from phanes_cli.synth.templates import Grid, Template, box_to_mni, white_matter_level
from phanes_cli.synth.variation import Anatomy
from phanes_cli.training.data import SliceSet


@dataclass(frozen=True)
class LesionedVolume:
    """A validation volume with one inserted real lesion and its exact ground truth."""

    id: str
    image: np.ndarray  # (X, Y, Z) float32, the volume's own intensity units
    brain: np.ndarray  # (X, Y, Z) bool
    truth: np.ndarray  # (X, Y, Z) bool
    voxel_ml: float


def noise_level(data: np.ndarray, brain: np.ndarray) -> float:
    """Robust noise std: MAD of neighbour differences / sqrt(2) inside the brain (edges are outliers)."""
    both = brain[1:] & brain[:-1]
    diff = (data[1:] - data[:-1])[both] / np.sqrt(2.0)
    if diff.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))))


def volume_anatomy(data: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> tuple[Anatomy, float]:
    """A volume as `synth` anatomy (white matter 1, tissue = brain brighter than half of it) and its WM level."""
    wm = white_matter_level(data, brain)
    if wm <= 0:
        raise PhanesError("tuning: a validation volume has no positive brain intensities")
    image = np.where(brain, data / wm, 0.0).astype(np.float32)
    axes = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in data.shape), indexing="ij")
    world = np.tensordot(affine[:3, :3].astype(np.float32), np.stack(axes), axes=1)
    world += affine[:3, 3].astype(np.float32)[:, None, None, None]
    tissue = (brain & (image > 0.5)).astype(np.float32)
    grid = Grid(shape=data.shape, affine=affine)
    return Anatomy(image=image, brain=brain, tissue=tissue, source_world=world, grid=grid), wm


def insert_lesion(data: np.ndarray, brain: np.ndarray, affine: np.ndarray, bank: ShapeBank, reference: Template,
                  rng: np.random.Generator, shapes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`shapes` real lesion masks blended into a volume one after the other: (image, truth, their union).

    Voxels outside the blends are untouched. A later shape never darkens an earlier lesion again: the tissue
    map of each step (brain brighter than half of white matter) no longer contains it.
    """
    image, truth = data, np.zeros(data.shape, dtype=bool)
    to_mni = box_to_mni(brain, affine, reference)
    sigma = noise_level(data, brain)
    for _ in range(shapes):
        anatomy, wm = volume_anatomy(image, brain, affine)
        lesioned = stroke_lesions(anatomy, rng, LesionConfig(), bank, to_mni)
        noise = sigma * rng.standard_normal(data.shape).astype(np.float32)
        image = np.where(lesioned.weight > 0, lesioned.image * wm + noise * lesioned.weight, image)
        image = np.clip(image, 0.0, None).astype(np.float32)
        truth |= lesioned.mask & brain
    return image, truth


def lesioned_validation(rows: Sequence[ManifestRow], bank: ShapeBank, reference: Template, copies: int,
                        seed: int, skull_strip: str = "auto", shapes: int = 1) -> list[LesionedVolume]:
    """`copies` lesioned versions of every validation row with `shapes` real masks each (seeded per row, copy)."""
    out: list[LesionedVolume] = []
    for i, row in enumerate(rows):
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip)
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        for copy in range(copies):
            rng = np.random.default_rng([seed, i, copy])
            image, truth = insert_lesion(volume.data, brain, volume.affine, bank, reference, rng, shapes)
            out.append(LesionedVolume(f"{row.id}+lesion{copy}", image, brain, truth, voxel_ml))
    return out


def dice_grid(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume], thresholds: np.ndarray,
              min_ml: Sequence[float]) -> np.ndarray:
    """Pooled Dice (T, M) of `s >= t`, components under each minimum size dropped, over all volumes."""
    tp = np.zeros((len(thresholds), len(min_ml)))
    predicted = np.zeros_like(tp)
    truth_total = 0
    for score, volume in zip(scores, volumes, strict=True):
        truth_total += int(volume.truth.sum())
        for i, t in enumerate(thresholds):
            labels, n = label_components((score >= t) & (score > 0) & volume.brain)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            overlap = np.bincount(labels[volume.truth], minlength=n + 1)[1:]
            for j, m in enumerate(min_ml):
                keep = sizes * volume.voxel_ml >= m
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
        pred = drop_small_lesions((score >= threshold) & (score > 0) & volume.brain, min_ml, volume.voxel_ml)
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
    values = stage1_values(backend, healthy, cfg.mask, batch_size)
    best: dict[str, Any] = {"dice": -1.0}
    per_percentile: dict[str, float] = {}
    for q in cfg.tune.mask_percentiles:
        mask_threshold = percentile_of(values, q)
        if not np.isfinite(mask_threshold) or mask_threshold <= 0:
            raise PhanesError("tuning: the healthy validation slices give no positive stage 1 map; train longer")
        provisional = Calibration(mask_threshold=mask_threshold, anomaly_threshold=float("inf"))
        scores = [run_volume(v.image, v.brain, backend, cfg, provisional, batch_size, keep=()).anomaly
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
