"""The paper's synthetic-anomaly protocol (Table 1) on healthy slices of a cohort.

Healthy mid-axial slices on the model grid get the paper's sprite anomalies (seeded rng); every method
then runs on the painted slices and is scored on the 128 x 128 grid, as in the paper:
- LPIPS (AlexNet) of the method's pseudo-healthy image against the clean slice, as the mean of the
  spatial LPIPS map over the anomaly pixels and over the remaining brain pixels, per slice, then the
  mean (and std) over slices. RA and the residual baseline are judged on their reconstruction x_cph.
- Pixel AUPRC and [Dice] (best Dice over the threshold sweep) pooled over the brain pixels of all
  slices with the streaming `CohortMetrics` (a slice is one "volume"), plus Dice at the calibrated level.

Slices: the paper takes one mid slice of each of 30 healthy subjects. With fewer healthy subjects, each
contributes several slices spread evenly over the central third of its brain slices, until there are
`n_slices`. Healthy subjects: rows of the evaluated split with kind "healthy"; if there are none, the
'val' rows without lesion masks (healthy by the project's convention: they calibrate the thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.evaluation.methods import (
    UNCALIBRATED,
    model_pseudo_healthy,
    predict,
    run_methods,
    scores_of,
    threshold,
)
from phanes_cli.evaluation.metrics import CohortMetrics, mean_std
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, select
from phanes_cli.synth.sprites import paint_sprites

SPRITES_PER_SLICE = 3
_PER_SLICE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("method", pa.string()), ("id", pa.string()), ("slice", pa.int64()), ("anomaly_pixels", pa.int64()),
    ("lpips_anomaly", pa.float64()), ("lpips_healthy", pa.float64()),
    ("auprc", pa.float64()), ("best_dice", pa.float64()), ("dice", pa.float64()),
]
PER_SLICE_SCHEMA = pa.schema(_PER_SLICE_COLUMNS)


@dataclass(frozen=True)
class HealthySlices:
    """Clean model-grid slices of healthy subjects, (N, 1, S, S) each, with where they came from."""

    x: Tensor
    brain: Tensor
    ids: list[str]
    slice_index: list[int]  # nearest axial index in the subject's RAS+ volume


@dataclass(frozen=True)
class SyntheticResult:
    """Table 1 figures: summary {"settings", "methods": {method: figures}} and a per-slice table."""

    summary: dict[str, Any]
    per_slice: pa.Table


def synthetic_subjects(rows: list[ManifestRow], split: str) -> tuple[list[ManifestRow], str]:
    """Healthy subjects for the protocol and the split they came from (see the module docstring)."""
    in_split = [r for r in select(rows, split=split) if r.kind == "healthy"]
    if in_split:
        return in_split, split
    return [r for r in select(rows, split="val") if r.lesion_mask is None], "val"


def central_positions(n_available: int, k: int) -> list[int]:
    """Up to k distinct indices of 0..n_available-1 spread over the central third; k == 1 -> the middle one."""
    if n_available <= 0 or k <= 0:
        return []
    centre = (n_available - 1) / 2
    if k == 1:
        return [round(centre)]
    half = n_available / 6
    positions = np.clip(np.round(centre + np.linspace(-half, half, k)), 0, n_available - 1).astype(int)
    return [int(p) for p in np.unique(positions)]


def mid_slices(rows: Sequence[ManifestRow], cfg: PhanesConfig, n_slices: int, skull_strip: str = "auto",
               device: str = "cpu") -> HealthySlices:
    """`n_slices` clean slices: the mid slice of each subject, or several central ones per subject when few."""
    if n_slices < 1:
        raise ValueError(f"synthetic_slices must be >= 1, got {n_slices}")
    rows = list(rows)[:n_slices]
    per_subject = math.ceil(n_slices / max(len(rows), 1))
    preprocess = replace(cfg.preprocess, slice_mode="brain")
    xs: list[Tensor] = []
    brains: list[Tensor] = []
    ids: list[str] = []
    index: list[int] = []
    for row in rows:
        volume, volume_brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip, device=device)
        prepared = prepare_volume(volume.data, volume_brain, preprocess, volume.zooms)
        picks = central_positions(prepared.geometry.n_slices, per_subject)
        xs.append(prepared.slices[picks])
        brains.append(prepared.brain[picks])
        ids.extend([row.id] * len(picks))
        index.extend(round(float(prepared.geometry.positions[p])) for p in picks)
    size = cfg.preprocess.image_size
    x = torch.cat(xs)[:n_slices] if xs else torch.zeros(0, 1, size, size)
    brain = torch.cat(brains)[:n_slices] if brains else torch.zeros(0, 1, size, size)
    return HealthySlices(x=x, brain=brain, ids=ids[:n_slices], slice_index=index[:n_slices])


def _masked_mean(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else float("nan")


def _lpips_to(images: np.ndarray, reference: Tensor, backend: Backend, batch_size: int) -> np.ndarray:
    """Spatial LPIPS of (N, 1, S, S) images against the clean slices, in batches: (N, S, S)."""
    parts = [backend.lpips(torch.from_numpy(images[i : i + batch_size]).to(backend.device),
                           reference[i : i + batch_size].to(backend.device))[:, 0].cpu().numpy()
             for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, *images.shape[2:]), dtype=np.float32)


def run_synthetic(
    rows: Sequence[ManifestRow],
    source_split: str,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    methods: Sequence[str],
    n_slices: int = 30,
    seed: int = 0,
    batch_size: int = 32,
    bins: int = 65536,
    max_score: float = 1.0,
    skull_strip: str = "auto",
) -> SyntheticResult:
    """Paint sprites on healthy slices of `rows`, run `methods`, and score them (paper Table 1)."""
    slices = mid_slices(rows, cfg, n_slices, skull_strip, str(backend.device))
    clean = slices.x[:, 0].numpy()
    brain = slices.brain[:, 0].numpy() > 0.5
    painted, masks = paint_sprites(clean, brain, np.random.default_rng(seed), count=SPRITES_PER_SLICE)
    x = torch.from_numpy(painted)[:, None]
    truth = torch.from_numpy(masks)[:, None].float()
    cohorts = {m: CohortMetrics(threshold=threshold(m, calibration), bins=bins, max_score=max_score) for m in methods}
    lpips: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    maps = run_methods(x, slices.brain, truth, backend, cfg, calibration, methods, batch_size, pseudo_healthy=True)
    scores = scores_of(methods, maps.phanes, maps.phanes_gt, maps.residual)
    for method in methods:
        lpips_map = _lpips_to(model_pseudo_healthy(maps, method), slices.x, backend, batch_size)
        for j in range(x.shape[0]):
            score = scores[method][j, 0]
            cohorts[method].add_volume(f"{slices.ids[j]}:{slices.slice_index[j]}", score,
                                       predict(method, score, brain[j], calibration), masks[j], brain[j], voxel_ml=1.0)
            healthy_part = brain[j] & ~masks[j]
            lpips[method].append((_masked_mean(lpips_map[j], masks[j]), _masked_mean(lpips_map[j], healthy_part)))

    rows_out: list[dict[str, Any]] = []
    figures: dict[str, dict[str, Any]] = {}
    for method in methods:
        summary = cohorts[method].summary()
        for volume, (anomaly, healthy) in zip(cohorts[method].volumes, lpips[method], strict=True):
            name, _, index = volume.id.rpartition(":")
            rows_out.append({"method": method, "id": name, "slice": int(index), "anomaly_pixels": round(volume.true_ml),
                             "lpips_anomaly": anomaly, "lpips_healthy": healthy, "auprc": volume.auprc,
                             "best_dice": volume.best_dice, "dice": None if method in UNCALIBRATED else volume.dice})
        anomaly_mean, anomaly_std = mean_std([a for a, _ in lpips[method]])
        healthy_mean, healthy_std = mean_std([h for _, h in lpips[method]])
        figures[method] = {
            "n_slices": len(cohorts[method].volumes),
            "lpips_anomaly": anomaly_mean, "lpips_anomaly_std": anomaly_std,
            "lpips_healthy": healthy_mean, "lpips_healthy_std": healthy_std,
            "auprc": summary["auprc"], "best_dice": summary["best_dice"],
            "best_dice_threshold": summary["best_dice_threshold"],
            "dice": None if method in UNCALIBRATED else summary["dice"],
            "auprc_mean": summary["auprc_mean"], "auprc_std": summary["auprc_std"],
            "clipped_fraction": summary["clipped_fraction"],
        }
    settings = {"source_split": source_split, "subjects": sorted(set(slices.ids)), "n_slices": int(x.shape[0]),
                "sprites_per_slice": SPRITES_PER_SLICE, "seed": seed}
    return SyntheticResult(summary={"settings": settings, "methods": figures},
                           per_slice=pa.Table.from_pylist(rows_out, schema=PER_SLICE_SCHEMA))
