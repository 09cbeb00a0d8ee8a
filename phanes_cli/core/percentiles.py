"""Percentiles of the pipeline's maps over healthy data: the rule behind every mask threshold.

The mask threshold binarises the stage 1 map m(x) on the model grid, so it is a percentile of m(x) over the
brain pixels of healthy slices: calibration takes it on the validation slices, the trainer on training
slices (the holes stage 2 learns to fill), tuning for every percentile it tries. With `mask.slice_context`
the map binarised is m(x) averaged across neighbouring slices (`core.slice_context`), so given the slices'
`volumes` (whole volumes, consecutive slices) the percentile is taken of that averaged map. The trainer's
spread-out slices have no neighbours: it passes no `volumes` and takes the plain m(x).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from phanes_cli.config import MaskConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.pipeline import stage1_map
from phanes_cli.core.slice_context import context_average


def percentile_of(chunks: list[Tensor] | list[np.ndarray], q: float) -> float:
    """The q-th percentile of the concatenated values (float64); NaN when there are none."""
    values = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in chunks]) if chunks else np.zeros(0)
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, q))


def stage1_values(backend: Backend, images: Tensor, brain: Tensor, cfg: MaskConfig, batch_size: int = 32,
                  advance: Callable[[], object] = lambda: None, volumes: Tensor | None = None) -> list[Tensor]:
    """m(x) over the brain pixels of (N, 1, S, S) slices, one 1-D tensor per batch (`advance` after each).

    With `cfg.slice_context` and `volumes` ((N,) volume of each slice, slices of a volume consecutive), the
    context-averaged m(x), as inference binarises it.
    """
    context = cfg.slice_context and volumes is not None
    values: list[Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(backend.device)
        b = brain[start : start + batch_size].to(backend.device)
        m = stage1_map(x, backend.reconstruct(x), b, backend, cfg).float().cpu()
        values.append(m if context else m[b.cpu() > 0])
        advance()
    if context and values:
        averaged = context_average(torch.cat(values), brain.cpu(), volumes)
        return [averaged[brain.cpu() > 0]]
    return values


def stage1_percentile(backend: Backend, images: Tensor, brain: Tensor, cfg: MaskConfig, batch_size: int = 32,
                      advance: Callable[[], object] = lambda: None, volumes: Tensor | None = None) -> float:
    """The `cfg.mask_percentile` of m(x) over the brain pixels of the slices (context-averaged with `volumes`, see
    `stage1_values`); NaN when there are none."""
    values = stage1_values(backend, images, brain, cfg, batch_size, advance, volumes)
    return percentile_of(values, cfg.mask_percentile)
