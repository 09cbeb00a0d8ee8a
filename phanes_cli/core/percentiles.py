"""Percentiles of the pipeline's maps over healthy data: the rule behind every mask threshold.

The mask threshold binarises the stage 1 map m(x) on the model grid, so it is a percentile of m(x) over the
brain pixels of healthy slices: calibration takes it on the validation slices, the trainer on training
slices (the holes stage 2 learns to fill), tuning for every percentile it tries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

from phanes_cli.config import MaskConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.pipeline import stage1_map


def percentile_of(chunks: list[Tensor] | list[np.ndarray], q: float) -> float:
    """The q-th percentile of the concatenated values (float64); NaN when there are none."""
    values = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in chunks]) if chunks else np.zeros(0)
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, q))


def stage1_values(backend: Backend, images: Tensor, brain: Tensor, cfg: MaskConfig, batch_size: int = 32,
                  advance: Callable[[], object] = lambda: None) -> list[Tensor]:
    """m(x) over the brain pixels of (N, 1, S, S) slices, one 1-D tensor per batch (`advance` after each)."""
    values: list[Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(backend.device)
        b = brain[start : start + batch_size].to(backend.device)
        values.append(stage1_map(x, backend.reconstruct(x), b, backend, cfg)[b > 0].float().cpu())
        advance()
    return values


def stage1_percentile(backend: Backend, images: Tensor, brain: Tensor, cfg: MaskConfig, batch_size: int = 32,
                      advance: Callable[[], object] = lambda: None) -> float:
    """The `cfg.mask_percentile` of m(x) over the brain pixels of the slices; NaN when there are none."""
    return percentile_of(stage1_values(backend, images, brain, cfg, batch_size, advance), cfg.mask_percentile)
