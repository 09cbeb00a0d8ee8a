# mypy: disable-error-code="no-untyped-def"
# (@triton.jit parameters are typed by Triton itself at launch: pointers, scalars, constexprs.)
"""Triton kernels for the pixel-wise steps around the networks: the mask step (Eq. 3) and the anomaly map (Eq. 4).

The torch references are the `phanes_cli.core.ops` functions (`ops.stage1_map`, `ops.binary_mask`,
`ops.compose`, `ops.anomaly_map` with PHANES_KERNELS=torch); these kernels compute the same values in fewer
passes over memory. The Gaussian filters are separable and use scipy's 'reflect' border like
`ops.gaussian_blur`: a vertical pass writes one intermediate plane, the horizontal pass is fused with
everything that follows it. Per-image thresholds and percentiles arrive as device tensors (from a
selection pass), so nothing waits on the host. All planes are (N, 1, H, W) float32, contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _block() -> int:
    """Pixels per program: 1024 on a GPU; the CPU interpreter runs programs one by one, so it gets bigger ones."""
    return 16384 if triton.knobs.runtime.interpret else 1024


@triton.jit
def _reflect(i, n):
    """scipy's 'reflect' (d c b a | a b c d) source index of a possibly out-of-range index, any distance out."""
    i = i % (2 * n)
    i = tl.where(i < 0, i + 2 * n, i)
    return tl.where(i >= n, 2 * n - 1 - i, i)


@triton.jit
def _vblur_kernel(src_ptr, brain_ptr, level_ptr, w_ptr, out_ptr, total, height, width, radius,
                  BINARY: tl.constexpr, BLOCK: tl.constexpr):
    """Vertical Gaussian pass. BINARY: the source is (src > level of its image) & brain, made on the fly."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < total
    plane = height * width
    base = (pix // plane) * plane
    row = (pix % plane) // width
    col = pix % width
    if BINARY:
        level = tl.load(level_ptr + pix // plane, mask=inside, other=0.0)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(0, 2 * radius + 1):
        at = base + _reflect(row + i - radius, height) * width + col
        value = tl.load(src_ptr + at, mask=inside, other=0.0)
        if BINARY:
            brain = tl.load(brain_ptr + at, mask=inside, other=0.0)
            value = ((value > level) & (brain > 0)).to(tl.float32)
        acc += tl.load(w_ptr + i) * value
    tl.store(out_ptr + pix, acc, mask=inside)


@triton.jit
def _hblur(src_ptr, pix, inside, width, w_ptr, radius, BLOCK: tl.constexpr):
    """Horizontal Gaussian pass at the pixels `pix` of row-major planes of the given width."""
    start = pix - pix % width
    col = pix % width
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for j in range(0, 2 * radius + 1):
        acc += tl.load(w_ptr + j) * tl.load(src_ptr + start + _reflect(col + j - radius, width), mask=inside, other=0.0)
    return acc


@triton.jit
def _stage1_map_kernel(eq_x_ptr, eq_rec_ptr, vblur_ptr, brain_ptr, pct_ptr, w_ptr, out_ptr, total, plane, width,
                   radius, eps, BLOCK: tl.constexpr):
    """m(x) = clip(|eq_rec - eq_x| * brain / percentile, 0, 1) * blur(LPIPS) * brain."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < total
    brain = tl.load(brain_ptr + pix, mask=inside, other=0.0)
    diff = tl.load(eq_rec_ptr + pix, mask=inside, other=0.0) - tl.load(eq_x_ptr + pix, mask=inside, other=0.0)
    scale = tl.maximum(tl.load(pct_ptr + pix // plane, mask=inside, other=1.0), eps)
    residual = tl.minimum(tl.maximum(tl.math.div_rn(tl.abs(diff) * brain, scale), 0.0), 1.0)
    perceptual = _hblur(vblur_ptr, pix, inside, width, w_ptr, radius, BLOCK)
    tl.store(out_ptr + pix, residual * perceptual * brain, mask=inside)


@triton.jit
def _dilated_kernel(vblur_ptr, brain_ptr, w_ptr, out_ptr, total, width, radius, threshold, BLOCK: tl.constexpr):
    """Dilated mask = (blurred binary mask > threshold) * brain."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < total
    grown = _hblur(vblur_ptr, pix, inside, width, w_ptr, radius, BLOCK) > threshold
    tl.store(out_ptr + pix, grown.to(tl.float32) * tl.load(brain_ptr + pix, mask=inside, other=0.0), mask=inside)


@triton.jit
def _compose_kernel(x_ptr, completed_ptr, mask_ptr, out_ptr, total, BLOCK: tl.constexpr):
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < total
    x = tl.load(x_ptr + pix, mask=inside)
    m = tl.load(mask_ptr + pix, mask=inside)
    tl.store(out_ptr + pix, x * (1.0 - m) + tl.load(completed_ptr + pix, mask=inside) * m, mask=inside)


@triton.jit
def _anomaly_kernel(x_ptr, x_ph_ptr, lpips_ptr, mask_ptr, brain_ptr, anomaly_ptr, total, BLOCK: tl.constexpr):
    """s(x) = |x_ph - x| * LPIPS * mask * brain."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < total
    brain = tl.load(brain_ptr + pix, mask=inside)
    diff = tl.load(x_ph_ptr + pix, mask=inside) - tl.load(x_ptr + pix, mask=inside)
    score = tl.abs(diff) * tl.load(lpips_ptr + pix, mask=inside) * tl.load(mask_ptr + pix, mask=inside) * brain
    tl.store(anomaly_ptr + pix, score, mask=inside)


def _planes(*tensors: Tensor) -> list[Tensor]:
    shape = tensors[0].shape
    for t in tensors:
        if t.dim() != 4 or t.shape[1] != 1 or t.shape != shape:
            raise ValueError(f"expected (N,1,H,W) planes of one shape, got {[tuple(u.shape) for u in tensors]}")
    return [t.to(torch.float32).contiguous() for t in tensors]


def _grid(total: int) -> tuple[int]:
    return (max(triton.cdiv(total, _block()), 1),)


def _vblur(src: Tensor, weights: Tensor, brain: Tensor | None = None, level: Tensor | None = None) -> Tensor:
    """Vertical pass of a separable filter; with brain and level, of the binary mask (src > level) & brain."""
    out = torch.empty_like(src)
    binary = brain is not None and level is not None
    _vblur_kernel[_grid(src.numel())](src, brain if binary else src, level if binary else src, weights, out,
                                      src.numel(), src.shape[2], src.shape[3], weights.numel() // 2,
                                      BINARY=binary, BLOCK=_block(), enable_fp_fusion=False)
    return out


def stage1_map_triton(eq_x: Tensor, eq_rec: Tensor, lpips: Tensor, brain: Tensor, percentile: Tensor,
                  weights: Tensor, eps: float) -> Tensor:
    """Stage 1 map from equalised images, the raw LPIPS map, the residual's per-image percentile (N,1,1,1)
    and the LPIPS smoothing kernel's taps (odd length, float32 on the same device)."""
    eq_x, eq_rec, lpips, brain = _planes(eq_x, eq_rec, lpips, brain)
    vertical = _vblur(lpips, weights)
    out = torch.empty_like(eq_x)
    _stage1_map_kernel[_grid(out.numel())](eq_x, eq_rec, vertical, brain, percentile.to(torch.float32).contiguous(),
                                       weights, out, out.numel(), out.shape[2] * out.shape[3], out.shape[3],
                                       weights.numel() // 2, eps, BLOCK=_block(), enable_fp_fusion=False)
    return out


def dilated_mask_triton(stage1_map: Tensor, brain: Tensor, level: Tensor, weights: Tensor, threshold: float) -> Tensor:
    """(stage1_map > level per image) & brain, dilated by Gaussian blur > threshold, restricted to the brain."""
    stage1_map, brain = _planes(stage1_map, brain)
    vertical = _vblur(stage1_map, weights, brain, level.to(torch.float32).contiguous())
    out = torch.empty_like(stage1_map)
    _dilated_kernel[_grid(out.numel())](vertical, brain, weights, out, out.numel(), out.shape[3],
                                        weights.numel() // 2, threshold, BLOCK=_block(), enable_fp_fusion=False)
    return out


def compose_triton(x: Tensor, completed: Tensor, mask: Tensor) -> Tensor:
    """x * (1 - m) + G * m."""
    x, completed, mask = _planes(x, completed, mask)
    out = torch.empty_like(x)
    _compose_kernel[_grid(out.numel())](x, completed, mask, out, out.numel(), BLOCK=_block(), enable_fp_fusion=False)
    return out


def anomaly_triton(x: Tensor, x_ph: Tensor, lpips: Tensor, mask: Tensor, brain: Tensor) -> Tensor:
    """The anomaly map s(x) (Eq. 4); the lesion rule is applied later, on the volume grid."""
    x, x_ph, lpips, mask, brain = _planes(x, x_ph, lpips, mask, brain)
    anomaly = torch.empty_like(x)
    _anomaly_kernel[_grid(x.numel())](x, x_ph, lpips, mask, brain, anomaly, x.numel(), BLOCK=_block(),
                                      enable_fp_fusion=False)
    return anomaly
