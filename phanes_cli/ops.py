"""Batched pre- and post-processing of the mask and anomaly maps: the single dispatch point.

Every function takes and returns tensors on any device and treats each image (and channel) of a
batch on its own. The screening and training code calls only these functions, so an accelerated
kernel (e.g. a Triton CLAHE beside `phanes_kernels.clahe`) replaces the torch reference here and
nowhere else; today every function runs the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from phanes_cli.config import MaskConfig
from phanes_kernels.clahe import clahe_torch

_EPS = 1e-8
_GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma


def clahe(x: Tensor, cfg: MaskConfig) -> Tensor:
    """CLAHE with the config's tiles, clip limit and bins (skimage-exact): (N,1,H,W) in [0,1] -> (N,1,H,W) in [0,1]."""
    return clahe_torch(x, tiles=cfg.clahe_tiles, clip_limit=cfg.clahe_clip, nbins=cfg.clahe_bins)


def _symmetric_indices(size: int, radius: int, device: torch.device) -> Tensor:
    """Source index of each of size + 2*radius samples under scipy's 'reflect' (d c b a | a b c d) padding."""
    idx = torch.arange(-radius, size + radius, device=device).remainder(2 * size)
    return torch.where(idx >= size, 2 * size - 1 - idx, idx)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter matching scipy.ndimage.gaussian_filter (mode 'reflect', truncate 4).

    (N,C,H,W) -> (N,C,H,W); each image and channel is filtered on its own (never across the batch).
    """
    if sigma <= 0:
        return x.clone()
    n, c, h, w = x.shape
    radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    kernel = _gaussian_kernel(sigma, radius, dtype, x.device)
    planes = x.reshape(n * c, 1, h, w).to(dtype)
    planes = planes.index_select(2, _symmetric_indices(h, radius, x.device))
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
    planes = planes.index_select(3, _symmetric_indices(w, radius, x.device))
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
    return planes.reshape(n, c, h, w)


def dilate_mask(mask: Tensor, sigma: float = 1.2, threshold: float = 0.1) -> Tensor:
    """Grow binary masks by about a pixel: Gaussian blur then > threshold, per image.

    (N,1,H,W) binary (bool or float) -> (N,1,H,W) float in {0, 1}.
    """
    return (gaussian_blur(mask.to(torch.float32), sigma) > threshold).to(torch.float32)


def percentile_per_image(x: Tensor, q: float, where: Tensor | None = None) -> Tensor:
    """q-th percentile (numpy's 'linear' rule) of each image over the pixels where `where` is True.

    x: (N,1,H,W); where: bool, broadcastable to x, or None for all pixels -> (N,1,1,1).
    Images without any selected pixel get 0.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    n = x.shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    values = x.reshape(n, -1).to(dtype)
    if where is None:
        counts = torch.full((n,), values.shape[1], device=x.device, dtype=torch.int64)
    else:
        selected = torch.broadcast_to(where.to(torch.bool), x.shape).reshape(n, -1)
        values = torch.where(selected, values, torch.full_like(values, float("inf")))
        counts = selected.sum(dim=1)
    ordered = values.sort(dim=1).values
    rank = (counts - 1).clamp_min(0).to(torch.float64) * (q / 100.0)
    lower = rank.floor().to(torch.int64)
    upper = rank.ceil().to(torch.int64)
    frac = (rank - lower).to(dtype)
    low_val = ordered.gather(1, lower.unsqueeze(1)).squeeze(1)
    high_val = ordered.gather(1, upper.unsqueeze(1)).squeeze(1)
    result = low_val + (high_val - low_val) * frac
    result = torch.where(counts > 0, result, torch.zeros_like(result))
    return result.view(n, 1, 1, 1)


def norm_percentile(x: Tensor, q: float = 95.0, where: Tensor | None = None) -> Tensor:
    """Divide each image by its q-th percentile (over `where`) and clip to [0, 1]: (N,1,H,W) -> (N,1,H,W).

    An image whose percentile is 0 is divided by a tiny epsilon: every non-zero pixel saturates to 1,
    which is the limit of the paper's norm95.
    """
    return (x / percentile_per_image(x, q, where).clamp_min(_EPS)).clamp(0.0, 1.0)
