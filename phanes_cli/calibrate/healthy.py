"""Calibration on healthy validation volumes (method.md): each threshold taken on the grid where it is applied.

1. mask_threshold binarises the stage 1 map m(x) on the model grid, so it is the `mask_percentile` (99th)
   of m(x) over the brain pixels of every validation slice (`core.percentiles`; paper: "the 99th
   percentile value on the healthy validation set"); with `mask.slice_context`, of m(x) averaged across
   neighbouring slices of each whole validation volume, the map inference binarises.
2. anomaly_threshold is the lesion rule's threshold, applied to s(x) restored onto each volume's own grid;
   so with that mask threshold each validation volume runs through `pipeline.run_volume`, and the threshold
   is the `anomaly_percentile` (99th) of s(x) over the brain voxels where s(x) > 0, on the volume grid. A
   healthy volume's voxels with s > 0 then exceed it in 1 - percentile/100 of cases.
3. min_lesion_ml: with both thresholds, each healthy volume's largest lesion component under the lesion
   rule; the `anomaly_percentile` of those sizes. Smaller components are what healthy brains give, so the
   rule drops them and a healthy brain almost never keeps one.

Why positive values only: s(x) is zero by construction outside the inpainting mask, which covers only a few
percent of healthy brain, so a percentile over all brain voxels is usually exactly 0 and would flag every
inpainted voxel. Taking it where the generator painted makes the lesion mask flag the top 1% of healthy
inpainting residuals, i.e. far fewer than 1% of healthy brain voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.components import label_components
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.percentiles import percentile_of, stage1_percentile
from phanes_cli.core.pipeline import run_volume
from phanes_cli.errors import PhanesError
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.training.data import SliceSet


@dataclass(frozen=True)
class HealthyScores:
    """s(x) of one healthy volume on its own grid, kept sparse: the brain voxels where s > 0."""

    shape: tuple[int, ...]
    index: np.ndarray  # flat indices of those voxels
    values: np.ndarray  # s(x) there, float32
    voxel_ml: float

    def dense(self) -> np.ndarray:
        score = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        score[self.index] = self.values
        return score.reshape(self.shape)


def healthy_scores(backend: Backend, rows: Sequence[ManifestRow], cfg: PhanesConfig, mask_threshold: float,
                   batch_size: int, skull_strip: str, device: str, bar: Progress) -> list[HealthyScores]:
    """Every healthy volume through the pipeline at `mask_threshold`: its positive s(x) on its own grid."""
    task = bar.add_task("anomaly maps", total=len(rows), info="healthy volumes")
    out: list[HealthyScores] = []
    for row in rows:
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip, device=device)
        anomaly = run_volume(volume.data, brain, volume.zooms, backend, cfg, mask_threshold, batch_size,
                             keep=()).anomaly
        index = np.flatnonzero((anomaly > 0) & brain)
        out.append(HealthyScores(anomaly.shape, index, anomaly.ravel()[index], volume.voxel_ml))
        bar.advance(task)
    return out


def largest_component_ml(scores: Sequence[HealthyScores], threshold: float) -> list[float]:
    """Per healthy volume, the size (mL) of its largest lesion candidate at `threshold` (0 when it has none)."""
    rule = LesionRule(threshold)
    sizes = []
    for volume in scores:
        score = volume.dense()
        labels, n = label_components(rule.candidates(score, score > 0))
        sizes.append(float(np.bincount(labels.ravel())[1:].max()) * volume.voxel_ml if n else 0.0)
    return sizes


def healthy_calibration(backend: Backend, data: SliceSet, rows: Sequence[ManifestRow], cfg: PhanesConfig,
                        batch_size: int, skull_strip: str, device: str, bar: Progress) -> Calibration:
    """Both thresholds and the minimum lesion size from healthy volumes (see the module docstring)."""
    if len(data) == 0:
        raise PhanesError("calibration: the healthy volumes hold no brain slices")
    task = bar.add_task("mask threshold", total=-(-len(data) // batch_size), info="stage 1 maps")
    mask_threshold = stage1_percentile(backend, data.images, data.brain, cfg.mask, batch_size,
                                       lambda: bar.advance(task), data.volume)
    if not np.isfinite(mask_threshold):
        raise PhanesError("calibration: the validation slices hold no brain pixels")
    scores = healthy_scores(backend, rows, cfg, mask_threshold, batch_size, skull_strip, device, bar)
    anomaly_threshold = percentile_of([s.values for s in scores], cfg.mask.anomaly_percentile)
    if not np.isfinite(anomaly_threshold):
        raise PhanesError("calibration: stage 1 masked no voxel of the validation volumes, so s(x) is zero "
                          "everywhere; the model cannot be calibrated (train longer or on more data)")
    minimum = float(np.percentile(largest_component_ml(scores, anomaly_threshold), cfg.mask.anomaly_percentile))
    return Calibration(mask_threshold=mask_threshold, anomaly_threshold=anomaly_threshold, n_slices=len(data),
                       n_volumes=len(rows), min_lesion_ml=minimum)
