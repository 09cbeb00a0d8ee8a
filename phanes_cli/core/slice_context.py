"""Context across slices: m(x) of each axial slice averaged with its neighbours before it is binarised.

The networks see one slice at a time, so a structure that is unusual in one slice (a ventricle horn cut
obliquely, a deep sulcus) gets a high m(x) there and a low one a slice away, while a lesion spans several
slices. Averaging m(x) as 1/4 previous + 1/2 own + 1/4 next keeps what persists across slices and halves
what does not (the stage 1 study measured half the false components). A slice at either end of its run
(first or last processed slice of a volume) has itself in place of the missing neighbour. The result is kept
inside the slice's own brain. `MaskConfig.slice_context` turns it on; then inference (`pipeline.infer_slices`,
two passes: every slice's m(x), then masks and inpainting) and calibration (`core.percentiles`, on whole
volumes) both binarise the averaged map, so the mask threshold is a percentile of the map it cuts.
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHTS = (0.25, 0.5, 0.25)


def context_average(m: Tensor, brain: Tensor, runs: Tensor | None = None) -> Tensor:
    """(N, 1, S, S) maps of consecutive slices -> the neighbour-weighted average, zero outside `brain`.

    `runs` (N,) labels which slices are neighbours: slices i and i + 1 are only when their labels are equal
    (one label per volume in a stack of several volumes); None: all N slices form one run.
    """
    if m.shape[0] == 0:
        return m
    same = torch.ones(m.shape[0] - 1, dtype=torch.bool, device=m.device)
    if runs is not None:
        labels = runs.to(m.device)
        same = labels[1:] == labels[:-1]
    keep = same.view(-1, 1, 1, 1)
    previous = torch.cat([m[:1], torch.where(keep, m[:-1], m[1:])])
    following = torch.cat([torch.where(keep, m[1:], m[:-1]), m[-1:]])
    a, b, c = WEIGHTS
    return (a * previous + b * m + c * following) * (brain > 0).to(m.dtype)
