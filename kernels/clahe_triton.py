# mypy: disable-error-code="no-untyped-def"
# (@triton.jit parameters are typed by Triton itself at launch: pointers, scalars, constexprs.)
"""Batched CLAHE in Triton for the model grid, agreeing with `clahe.py` (the torch reference) grey level for grey level.

Three launches, none of which waits on the host:

1. ``_levels_kernel`` (one program per image): skimage's quantisation to 14 bits and the bin of every pixel;
2. ``_tile_map_kernel`` (a few tiles per program): tile histogram, clipping with skimage's redistribution
   (a device-side loop over bins and passes), cumulative histogram -> grey-level map;
3. ``_blend_kernel`` (one program per image): bilinear blending of the four surrounding tile maps,
   truncation, and the per-image min-max rescale.

Only images whose sides are multiples of the tile size are handled (the model grid: 128 px, 8 x 8 tiles):
there the histogram tiles never reach into the reflected border. Every rounding step uses the same
precision and IEEE rounding as the reference (fp64 for the stretch and maps, `div_rn` for fp32 divisions);
launches disable FMA contraction so that blending sums round exactly as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_GREY_LEVELS = 2**14
# The combine functions behind tl.sum / tl.min / tl.max / tl.cumsum, used directly: no jit function of triton's
# own library then runs inside the interpreter, so tests can re-create these kernels under TRITON_INTERPRET
# after triton was imported, and the interpreter takes its numpy fast paths.
_SUM = tl.standard._sum_combine
_MIN = tl.standard._elementwise_min
_MAX = tl.standard._elementwise_max
_BLOCK = 1024


def _tiles_per_program() -> int:
    """Tiles per program of the histogram launch: 8 on a GPU, more for the one-by-one CPU interpreter."""
    return 64 if triton.knobs.runtime.interpret else 8


def supports(height: int, width: int, tiles: int) -> bool:
    """Whether the Triton CLAHE handles this image size: both sides whole multiples of the tile size."""
    kh, kw = max(height // tiles, 1), max(width // tiles, 1)
    return height % kh == 0 and width % kw == 0


@triton.jit
def _rint(v):
    """Round half to even (torch.round), exact for |v| < 2**22 in fp32 and far beyond in fp64."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _levels_kernel(x_ptr, bins_ptr, npix, GREY: tl.constexpr, BIN_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    img = tl.program_id(0).to(tl.int64)
    base = img * npix
    offs = tl.arange(0, BLOCK)
    qmin = tl.full([BLOCK], float("inf"), tl.float64)
    qmax = tl.full([BLOCK], float("-inf"), tl.float64)
    for start in range(0, npix, BLOCK):
        inside = start + offs < npix
        v = tl.load(x_ptr + base + start + offs, mask=inside, other=0.0)
        q = _rint(tl.minimum(tl.maximum(v, 0.0), 1.0) * 65535.0).to(tl.float64)
        qmin = tl.minimum(qmin, tl.where(inside, q, float("inf")))
        qmax = tl.maximum(qmax, tl.where(inside, q, float("-inf")))
    lo = tl.reduce(qmin, 0, _MIN)
    span = tl.reduce(qmax, 0, _MAX) - lo
    for start in range(0, npix, BLOCK):
        inside = start + offs < npix
        v = tl.load(x_ptr + base + start + offs, mask=inside, other=0.0)
        q = _rint(tl.minimum(tl.maximum(v, 0.0), 1.0) * 65535.0).to(tl.float64)
        stretched = _rint((q - lo) / tl.maximum(span, 1.0) * (GREY - 1))
        level = tl.where(span > 0, stretched, tl.minimum(q, GREY - 1.0)).to(tl.int32)
        tl.store(bins_ptr + base + start + offs, (level // BIN_SIZE).to(tl.int16), mask=inside)


@triton.jit
def _tile_map_kernel(
    bins_ptr, maps_ptr, ntiles, height, width, nh, nw, clim, nbins,
    KH: tl.constexpr, KW: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr, TILES: tl.constexpr,
    GREY: tl.constexpr,
):
    """TILES tiles per program, one row each; rows run in lockstep like the reference's clipping."""
    tile = tl.program_id(0).to(tl.int64) * TILES + tl.arange(0, TILES)
    real = tile < ntiles
    img = tile // (nh * nw)
    ty = (tile // nw) % nh
    tx = tile % nw
    p = tl.arange(0, TILE)
    inside = real[:, None] & (p < KH * KW)[None, :]
    rows = ty[:, None] * KH + (p // KW)[None, :]
    cols = tx[:, None] * KW + (p % KW)[None, :]
    b = tl.load(bins_ptr + img[:, None] * height * width + rows * width + cols, mask=inside, other=0).to(tl.int32)
    row_bin = tl.arange(0, TILES)[:, None] * NB + b
    hist = tl.reshape(tl.histogram(tl.reshape(row_bin, [TILES * TILE]), TILES * NB,
                                   mask=tl.reshape(inside, [TILES * TILE])), [TILES, NB])
    bin_ids = tl.arange(0, NB)[None, :]
    valid = bin_ids < nbins

    # skimage's clip: cut at the limit, a uniform increment, then fill the bins just under the limit.
    excess = tl.reduce(tl.maximum(hist - clim, 0), 1, _SUM)
    hist = tl.minimum(hist, clim)
    increment = excess // nbins
    upper = (clim - increment)[:, None]
    low = (hist < upper) & valid
    excess -= tl.reduce(low.to(tl.int32), 1, _SUM) * increment
    hist += low.to(tl.int32) * increment[:, None]
    mid = (hist >= upper) & (hist < clim) & valid
    excess += tl.reduce(tl.where(mid, hist - clim, 0), 1, _SUM)
    hist = tl.where(mid, clim, hist)

    # Its strided round-robin passes: at bin `index`, one count to every under-limit bin at index + k*step.
    index = tl.full([TILES], 0, tl.int32)
    pass_start = excess
    active = excess > 0
    while tl.reduce(active.to(tl.int32), 0, _MAX) > 0:
        under = (hist < clim) & valid
        step = tl.maximum(tl.reduce(under.to(tl.int32), 1, _SUM) // tl.maximum(excess, 1), 1)
        offset = bin_ids - index[:, None]
        chosen = (under & active[:, None] & (offset >= 0) & (offset % step[:, None] == 0)).to(tl.int32)
        hist += chosen
        excess -= tl.reduce(chosen, 1, _SUM)
        index += 1
        wrapped = index == nbins
        stalled = wrapped & (excess == pass_start)
        index = tl.where(wrapped, 0, index)
        pass_start = tl.where(wrapped, excess, pass_start)
        active = active & (excess > 0) & (stalled == 0)

    scale = tl.full([], GREY - 1, tl.float64) / (KH * KW)
    cdf = tl.associative_scan(hist, 1, _SUM).to(tl.float64)
    grey = tl.floor(tl.minimum(cdf * scale, GREY - 1.0)).to(tl.float32)
    tl.store(maps_ptr + tile[:, None] * nbins + bin_ids, grey, mask=real[:, None] & valid)


@triton.jit
def _blend_kernel(
    bins_ptr, maps_ptr, scratch_ptr, out_ptr, height, width, nh, nw, nbins,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    npix = height * width
    base = img * npix
    offs = tl.arange(0, BLOCK)
    rmin = tl.full([BLOCK], float("inf"), tl.float32)
    rmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, npix, BLOCK):
        pix = start + offs
        inside = pix < npix
        b = tl.load(bins_ptr + base + pix, mask=inside, other=0).to(tl.int64)
        rows = pix // width + KH // 2
        cols = pix % width + KW // 2
        wy = tl.math.div_rn((rows % KH).to(tl.float32), KH * 1.0)
        wx = tl.math.div_rn((cols % KW).to(tl.float32), KW * 1.0)
        # Cell c of the replicate-padded map grid is tile clamp(c - 1): blocks rows // KH and rows // KH + 1.
        ty0 = tl.minimum(tl.maximum(rows // KH - 1, 0), nh - 1)
        ty1 = tl.minimum(rows // KH, nh - 1)
        tx0 = tl.minimum(tl.maximum(cols // KW - 1, 0), nw - 1)
        tx1 = tl.minimum(cols // KW, nw - 1)
        first = img * nh
        m00 = tl.load(maps_ptr + ((first + ty0) * nw + tx0) * nbins + b, mask=inside, other=0.0)
        m01 = tl.load(maps_ptr + ((first + ty0) * nw + tx1) * nbins + b, mask=inside, other=0.0)
        m10 = tl.load(maps_ptr + ((first + ty1) * nw + tx0) * nbins + b, mask=inside, other=0.0)
        m11 = tl.load(maps_ptr + ((first + ty1) * nw + tx1) * nbins + b, mask=inside, other=0.0)
        result = m00 * ((1.0 - wy) * (1.0 - wx))
        result = result + m01 * ((1.0 - wy) * wx)
        result = result + m10 * (wy * (1.0 - wx))
        result = tl.floor(result + m11 * (wy * wx))
        tl.store(scratch_ptr + base + pix, result, mask=inside)
        rmin = tl.minimum(rmin, tl.where(inside, result, float("inf")))
        rmax = tl.maximum(rmax, tl.where(inside, result, float("-inf")))
    lo = tl.reduce(rmin, 0, _MIN)
    span = tl.reduce(rmax, 0, _MAX) - lo
    tl.debug_barrier()
    for start in range(0, npix, BLOCK):
        pix = start + offs
        inside = pix < npix
        result = tl.load(scratch_ptr + base + pix, mask=inside, other=0.0)
        scaled = tl.math.div_rn(result - lo, tl.maximum(span, 1.0))
        rescaled = tl.where(span > 0, scaled, tl.minimum(tl.maximum(result, 0.0), 1.0))
        tl.store(out_ptr + base + pix, rescaled, mask=inside)


def clahe_triton(x: Tensor, tiles: int = 8, clip_limit: float = 0.01, nbins: int = 256) -> Tensor:
    """Same contract as `clahe.clahe_torch` for images whose sides are multiples of the tile size."""
    if x.dim() not in (3, 4):
        raise ValueError(f"expected (N,H,W) or (N,C,H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1], got dtype {x.dtype}")
    height, width = x.shape[-2:]
    if not supports(height, width, tiles):
        raise ValueError(f"Triton CLAHE needs sides that are multiples of the tile: {height}x{width}, {tiles} tiles")
    if x.numel() == 0:
        return x.clone()
    kh, kw = max(height // tiles, 1), max(width // tiles, 1)
    nh, nw = height // kh, width // kw
    img = x.reshape(-1, height, width).contiguous()
    batch, npix, device = img.shape[0], height * width, img.device
    clim = int(max(clip_limit * kh * kw, 1)) if clip_limit > 0 else kh * kw
    bins = torch.empty(batch, height, width, dtype=torch.int16, device=device)
    maps = torch.empty(batch * nh * nw, nbins, dtype=torch.float32, device=device)
    scratch = torch.empty(batch, height, width, dtype=torch.float32, device=device)
    out = torch.empty_like(img)
    _levels_kernel[(batch,)](img, bins, npix, GREY=_GREY_LEVELS, BIN_SIZE=1 + _GREY_LEVELS // nbins,
                             BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False)
    ntiles = batch * nh * nw
    per_program = _tiles_per_program()
    _tile_map_kernel[(triton.cdiv(ntiles, per_program),)](
        bins, maps, ntiles, height, width, nh, nw, clim, nbins, KH=kh, KW=kw, TILE=triton.next_power_of_2(kh * kw),
        NB=triton.next_power_of_2(nbins), TILES=per_program, GREY=_GREY_LEVELS, num_warps=4, enable_fp_fusion=False)
    _blend_kernel[(batch,)](bins, maps, scratch, out, height, width, nh, nw, nbins, KH=kh, KW=kw,
                            BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False)
    return out.reshape(x.shape)
