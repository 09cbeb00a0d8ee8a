"""Random inpainting masks for stage 2 training: small filled ellipses plus free-form strokes.

Stage 1 masks of healthy images are few and small, so the generator also learns from random holes
(method.md): about ten small ellipses per image with centres in the central half of the image (where
the brain is), and with probability 0.5 one or two thick free-form strokes (AOT-GAN style). Everything
is rasterised in one batched pass; shapes are drawn from a CPU generator for reproducibility.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SEMI_AXIS_RANGE = (1.0 / 64.0, 1.0 / 12.0)  # fraction of the side: 2 to ~11 px at 128 px
STROKE_PROBABILITY = 0.5
STROKE_VERTICES = 4
STROKE_STEP_RANGE = (1.0 / 16.0, 1.0 / 6.0)  # segment length, fraction of the side
STROKE_RADIUS_RANGE = (1.0 / 64.0, 1.0 / 32.0)  # half width, fraction of the side


def _pixel_grid(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    coords = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    return coords.view(size, 1), coords.view(1, size)  # rows (dim -2), columns (dim -1)


def _central(shape: tuple[int, ...], size: int, generator: torch.Generator) -> Tensor:
    """Uniform positions in the central half [S/4, 3S/4)."""
    return size * (0.25 + 0.5 * torch.rand(shape, generator=generator))


def random_ellipses(n: int, size: int, count: int, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> Tensor:
    """(N, 1, S, S) union of `count` rotated filled ellipses per image, float {0, 1}."""
    if count <= 0:
        return torch.zeros(n, 1, size, size, device=device)
    lo, hi = SEMI_AXIS_RANGE
    cy, cx = _central((n, count), size, generator), _central((n, count), size, generator)
    axes = size * (lo + (hi - lo) * torch.rand(2, n, count, generator=generator))
    angle = math.pi * torch.rand(n, count, generator=generator)
    cy, cx, axes, angle = (t.to(device) for t in (cy, cx, axes, angle))
    rows, cols = _pixel_grid(size, torch.device(device))
    dy = rows - cy[..., None, None]
    dx = cols - cx[..., None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = (u / axes[0][..., None, None]) ** 2 + (v / axes[1][..., None, None]) ** 2 <= 1.0
    return inside.any(dim=1, keepdim=True).float()


def random_strokes(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """(N, 1, S, S) free-form strokes: with probability 0.5 one or two thick random polylines per image."""
    strokes = 2
    segments = STROKE_VERTICES - 1
    start_y, start_x = _central((n, strokes), size, generator), _central((n, strokes), size, generator)
    lo, hi = STROKE_STEP_RANGE
    step = size * (lo + (hi - lo) * torch.rand(n, strokes, segments, generator=generator))
    heading = 2 * math.pi * torch.rand(n, strokes, 1, generator=generator)
    turns = heading + torch.cumsum((torch.rand(n, strokes, segments, generator=generator) - 0.5) * math.pi, dim=2)
    rlo, rhi = STROKE_RADIUS_RANGE
    radius = size * (rlo + (rhi - rlo) * torch.rand(n, strokes, generator=generator))
    draw = torch.rand(n, generator=generator) < STROKE_PROBABILITY
    second = torch.rand(n, generator=generator) < 0.5
    ys = torch.cat([start_y[..., None], start_y[..., None] + torch.cumsum(step * torch.sin(turns), dim=2)], dim=2)
    xs = torch.cat([start_x[..., None], start_x[..., None] + torch.cumsum(step * torch.cos(turns), dim=2)], dim=2)
    enabled = torch.stack([draw, draw & second], dim=1)  # (N, strokes)
    ys, xs, radius, enabled = (t.to(device) for t in (ys, xs, radius, enabled))
    rows, cols = _pixel_grid(size, torch.device(device))
    ay, ax = ys[..., :-1, None, None], xs[..., :-1, None, None]  # (N, strokes, segments, 1, 1)
    by, bx = ys[..., 1:, None, None], xs[..., 1:, None, None]
    vy, vx = by - ay, bx - ax
    t = (((rows - ay) * vy + (cols - ax) * vx) / (vy * vy + vx * vx).clamp_min(1e-6)).clamp(0.0, 1.0)
    dist2 = (rows - (ay + t * vy)) ** 2 + (cols - (ax + t * vx)) ** 2
    near = (dist2 <= radius[..., None, None, None] ** 2).any(dim=2)  # (N, strokes, S, S)
    near = near & enabled[..., None, None]
    return near.any(dim=1, keepdim=True).float()


def random_training_masks(n: int, size: int, ellipses: int, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> Tensor:
    """(N, 1, S, S) random holes for stage 2: ellipses united with optional strokes."""
    shapes = random_ellipses(n, size, ellipses, generator, device)
    return torch.maximum(shapes, random_strokes(n, size, generator, device))
