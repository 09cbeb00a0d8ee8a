"""The paper's 2D training augmentation, batched on the device.

Per image: rotation up to 10 degrees, translation up to 10% of the image side, isotropic scale 0.9-1.1
and a left-right flip with probability 0.5. One sampling grid per image is applied to the image and to
every mask channel at once, so they can never drift apart.

Axes: model slices are (X, Y) = (left-right, posterior-anterior) in RAS+ order, so the anatomical
"horizontal" (left-right mirror) flip reverses dim -2, not the last dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROTATION_DEG = 10.0
MAX_TRANSLATION = 0.1  # fraction of the image side
SCALE_RANGE = (0.9, 1.1)
FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class AffineParams:
    """Per-image transform parameters, each (N,)."""

    angle_deg: Tensor
    shift_x: Tensor  # along dim -2 (left-right), fraction of the side
    shift_y: Tensor  # along dim -1, fraction of the side
    scale: Tensor
    flip: Tensor  # bool: mirror left-right


def sample_params(n: int, generator: torch.Generator) -> AffineParams:
    """Draw the paper's augmentation parameters for n images from a CPU generator."""
    u = torch.rand(5, n, generator=generator, dtype=torch.float64)
    lo, hi = SCALE_RANGE
    return AffineParams(
        angle_deg=(u[0] * 2 - 1) * MAX_ROTATION_DEG,
        shift_x=(u[1] * 2 - 1) * MAX_TRANSLATION,
        shift_y=(u[2] * 2 - 1) * MAX_TRANSLATION,
        scale=lo + u[3] * (hi - lo),
        flip=u[4] < FLIP_PROBABILITY,
    )


def sampling_matrices(p: AffineParams) -> Tensor:
    """(N, 2, 3) `affine_grid` matrices: output coordinates -> input coordinates (the inverse transform).

    The forward transform on normalised coordinates (u along dim -1, v along dim -2) is: mirror v,
    scale, rotate, then shift (a shift of 0.1 of the side is 0.2 in [-1, 1] coordinates).
    """
    n = p.angle_deg.shape[0]
    a = p.angle_deg * math.pi / 180.0
    cos, sin = torch.cos(a), torch.sin(a)
    mirror = torch.where(p.flip, -1.0, 1.0).to(torch.float64)
    forward = torch.zeros(n, 3, 3, dtype=torch.float64)
    forward[:, 0, 0] = p.scale * cos
    forward[:, 0, 1] = -p.scale * sin * mirror
    forward[:, 1, 0] = p.scale * sin
    forward[:, 1, 1] = p.scale * cos * mirror
    forward[:, 0, 2] = 2.0 * p.shift_y
    forward[:, 1, 2] = 2.0 * p.shift_x
    forward[:, 2, 2] = 1.0
    return torch.linalg.inv(forward)[:, :2, :].to(torch.float32)


def apply_affine(stack: Tensor, theta: Tensor) -> Tensor:
    """Resample (N, C, S, S) with (N, 2, 3) matrices, bilinear, zeros outside."""
    grid = F.affine_grid(theta.to(stack.device), list(stack.shape), align_corners=False)
    return F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(images: Tensor, masks: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random paper augmentation of images (N, 1, S, S) and binary masks (N, K, S, S), identical per image.

    Masks are resampled bilinearly with the image and re-binarised at 0.5; images stay in [0, 1].
    """
    theta = sampling_matrices(sample_params(images.shape[0], generator))
    out = apply_affine(torch.cat([images, masks.to(images.dtype)], dim=1), theta)
    return out[:, :1].clamp(0.0, 1.0), (out[:, 1:] >= 0.5).to(images.dtype)
