"""A case brought within the viewer page's voxel budget: coarser voxels for display, said on the page.

A viewer page embeds every layer (`viewer.py` says why), so its size grows with the voxels shown: a
very large volume made a 128 MB page that a browser could not open. Above VOXEL_BUDGET voxels per layer the
case is shown on blocks of f x f x f voxels, f the smallest integer that brings it under the budget: the
image and pseudo-healthy image as block means, the anomaly map as block maxima (a hot spot stays as hot),
lesion and ground-truth masks where any voxel of the block is set (a small lesion stays visible), the
brain where most of the block is brain. The affine follows (voxel size x f, origin at the first block's
centre), so world coordinates, the views' centre and the colour bar keep their meaning; the files the
page links to keep full resolution. A 1 mm brain cropped to its mask (about 4.5 M voxels) is shown as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from phanes_cli.cohort_report.cases import CaseArrays

VOXEL_BUDGET = 8_000_000  # per layer: a page then stays within a few tens of MB even for noise


def _blocks(array: np.ndarray, factor: int, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """`array` reduced over f x f x f blocks (the last, partial blocks padded with their edge values)."""
    pad = [(0, -n % factor) for n in array.shape]
    padded = np.pad(array, pad, mode="edge")
    x, y, z = (n // factor for n in padded.shape)
    return reduce(padded.reshape(x, factor, y, factor, z, factor), axis=(1, 3, 5))


def within_budget(arrays: CaseArrays, budget: int = VOXEL_BUDGET) -> CaseArrays:
    """`arrays` as they are when within `budget` voxels, else on coarser voxels with a note saying so."""
    size = arrays.image.size
    if size <= budget:
        return arrays
    factor = math.ceil((size / budget) ** (1 / 3))
    while math.prod(math.ceil(n / factor) for n in arrays.image.shape) > budget:
        factor += 1
    (zx, zy, zz), (cx, cy, cz) = arrays.zooms, arrays.centre
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    coarse = _blocks(arrays.image.astype(np.float32), factor, np.mean)
    note = (f"shown on {factor}x{factor}x{factor} blocks of voxels ({'x'.join(map(str, arrays.image.shape))} -> "
            f"{'x'.join(map(str, coarse.shape))}) to keep this page small; the linked files keep full resolution")
    return replace(
        arrays, image=coarse, anomaly=_blocks(arrays.anomaly.astype(np.float32), factor, np.max),
        lesion=_blocks(arrays.lesion, factor, np.any), brain=_blocks(arrays.brain.astype(np.float32), factor,
                                                                        np.mean) >= 0.5,
        truth=None if arrays.truth is None else _blocks(arrays.truth, factor, np.any),
        pseudo_healthy=None if arrays.pseudo_healthy is None else _blocks(
            arrays.pseudo_healthy.astype(np.float32), factor, np.mean),
        affine=arrays.affine @ scale, zooms=(zx * factor, zy * factor, zz * factor),
        centre=(cx // factor, cy // factor, cz // factor), notes=(*arrays.notes, note))
