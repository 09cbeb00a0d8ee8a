"""Volume -> model slices and back (method.md "Data conventions").

A volume on its RAS+ grid is scaled by the 98th percentile of its brain voxels and clipped to [0, 1];
its axial slices that hold enough brain are cut to a fixed physical field of view (`field_mm`, square, centred on
the brain mask's in-plane extent; zero padding where the file's grid ends) and resized to `image_size` (bilinear).
So a model pixel is `field_mm / image_size` mm whatever the file's voxel size, field of view, cropping or
orientation: the same brain reaches the networks at the same scale and place. `restore_volume` is the exact
inverse of the geometry (resize back to the window, put the window back in place), so model maps land on the
native voxel grid; voxels outside the window get the fill value.
All steps are batched over slices with torch: no Python loop per slice or voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from phanes_cli.config import PreprocessConfig

AXIAL_AXIS = 2  # in RAS+ voxel order, axis 2 runs inferior -> superior


@dataclass(frozen=True)
class SliceGeometry:
    """How the volume maps onto model slices: axial planes at `positions`, each cut to the square window."""

    volume_shape: tuple[int, int, int]
    positions: np.ndarray  # (N,) axial position of each model slice in native slice units (fractional)
    window: tuple[int, int]  # the field of view in native voxels along axes 0 and 1
    origin: tuple[int, int]  # native index of the window's first voxel (negative: the window starts outside)
    image_size: int

    @property
    def n_slices(self) -> int:
        return int(self.positions.shape[0])

    @property
    def covered(self) -> np.ndarray:
        """Native axial slices between the first and last model slice: the ones the maps are restored on."""
        if self.n_slices == 0:
            return np.zeros(0, dtype=np.int64)
        low = max(0, int(np.ceil(self.positions[0] - 1e-6)))
        high = min(self.volume_shape[2] - 1, int(np.floor(self.positions[-1] + 1e-6)))
        return np.arange(low, high + 1, dtype=np.int64)


@dataclass(frozen=True)
class PreparedVolume:
    """Model-ready slices of one volume with their brain masks and the geometry to undo."""

    slices: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]
    brain: torch.Tensor  # (N, 1, S, S) float32 in {0, 1}
    geometry: SliceGeometry
    scale: float  # intensity divided out (the brain's percentile)


def auto_brain_mask(data: np.ndarray) -> np.ndarray:
    """Robust foreground estimate of a (skull-stripped) T1 volume: (X, Y, Z) float -> bool.

    Threshold at a small fraction of the 98th percentile of positive voxels, keep the largest
    connected component and fill its holes. Connected components run on a 2x-subsampled grid and the
    result is brought back by nearest neighbour, which keeps this step cheap next to file decoding.
    """
    sample = data[::3, ::3, ::3]
    positive = sample[sample > 0]
    if positive.size == 0:
        positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    level = 0.05 * float(np.percentile(positive, 98))
    coarse = data[::2, ::2, ::2] > level
    labels, n = ndimage.label(coarse)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        coarse = labels == int(np.argmax(sizes))
    coarse = ndimage.binary_fill_holes(ndimage.binary_closing(coarse, iterations=1))
    full = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)[: data.shape[0], : data.shape[1], : data.shape[2]]
    return full & (data > 0.25 * level)


def intensity_scale(data: np.ndarray, brain: np.ndarray, percentile: float) -> float:
    """The brain's intensity percentile (positive voxels), the divisor that maps tissue to [0, 1]."""
    values = data[brain]
    values = values[values > 0]
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    if scale <= 0:
        scale = float(data.max()) if data.max() > 0 else 1.0
    return scale


def select_slices(brain: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Axial slices to process: all with at least `min_brain_fraction` of the largest brain section, or the mid one."""
    area = brain.sum(axis=(0, 1))
    if area.max() == 0:
        return np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(area > 0)
    if cfg.slice_mode == "mid":
        return np.array([(present[0] + present[-1]) // 2], dtype=np.int64)
    return np.flatnonzero(area >= cfg.min_brain_fraction * area.max()).astype(np.int64)


def field_window(zooms: tuple[float, float, float], field_mm: float) -> tuple[int, int]:
    """The square field of view in native voxels along the two in-plane axes (at least one voxel each)."""
    return (max(1, round(field_mm / float(zooms[0]))), max(1, round(field_mm / float(zooms[1]))))


def slice_positions(index: np.ndarray, centre: float, zoom_z: float, spacing_mm: float) -> np.ndarray:
    """Axial model-slice positions in native slice units: `spacing_mm` apart from the brain's centroid `centre`,
    covering the selected slices `index`, so the same brain is cut at the same physical planes whatever its
    slice spacing or crop (a centroid moves less than a voxel under resampling; the selected range's ends do not)."""
    if index.size == 0:
        return np.zeros(0, dtype=np.float64)
    if index.size == 1:
        return np.array([float(index[0])])
    step = spacing_mm / float(zoom_z)
    low = int(np.floor((float(index.min()) - centre) / step + 1e-6))
    high = int(np.ceil((float(index.max()) - centre) / step - 1e-6))
    return centre + step * np.arange(low, high + 1, dtype=np.float64)


def blur_sigmas(zooms: tuple[float, float, float], resolution_mm: float) -> tuple[float, float, float]:
    """Gaussian sigma (voxels) per axis that brings a voxel size of `zooms` to an effective `resolution_mm`
    (FWHM^2 adds up): finer files are blurred to the resolution the model works at, coarser ones are left."""
    fwhm = 2.0 * np.sqrt(2.0 * np.log(2.0))
    return tuple(float(np.sqrt(max(resolution_mm ** 2 - float(z) ** 2, 0.0)) / fwhm / float(z))  # type: ignore[return-value]
                 for z in zooms)


def _geometry(brain: np.ndarray, index: np.ndarray, zooms: tuple[float, float, float],
              cfg: PreprocessConfig) -> SliceGeometry:
    """The window of `cfg.field_mm` centred on the brain's in-plane bounding box (the grid's centre without brain),
    and slice positions `cfg.pixel_mm` apart over the selected slices."""
    shape: tuple[int, int, int] = (int(brain.shape[0]), int(brain.shape[1]), int(brain.shape[2]))
    window = field_window(zooms, cfg.field_mm)
    origin = []
    for axis, other in ((0, (1, 2)), (1, (0, 2))):
        present = np.flatnonzero(brain.any(axis=other))
        centre = (present[0] + present[-1]) / 2.0 if present.size else (shape[axis] - 1) / 2.0
        origin.append(int(np.floor(centre - (window[axis] - 1) / 2.0 + 0.5)))
    area = brain.sum(axis=(0, 1), dtype=np.float64)
    centre = float((area * np.arange(shape[2])).sum() / area.sum()) if area.sum() else (shape[2] - 1) / 2.0
    return SliceGeometry(volume_shape=shape, positions=slice_positions(index, centre, zooms[2], cfg.pixel_mm),
                         window=window, origin=(origin[0], origin[1]), image_size=cfg.image_size)


def sample_slices(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (N, X, Y) float32: linear interpolation between native axial slices at `positions`,
    zeros beyond the grid (a padded file samples the same values)."""
    z = volume.shape[2]
    below = np.floor(positions).astype(np.int64)
    weight = (positions - below).astype(np.float32)
    out = np.zeros((positions.size, volume.shape[0], volume.shape[1]), dtype=np.float32)
    for offset, w in ((0, 1.0 - weight), (1, weight)):
        idx = below + offset
        inside = (idx >= 0) & (idx < z) & (w > 0)
        if inside.any():
            taken = np.moveaxis(volume[:, :, idx[inside]], 2, 0).astype(np.float32, copy=False)
            out[inside] += taken * w[inside, None, None]
    return out


def to_model_grid(stack: torch.Tensor, geometry: SliceGeometry, mode: str = "bilinear") -> torch.Tensor:
    """(N, C, X, Y) native slices -> (N, C, S, S): cut the window (zeros beyond the grid), then resize.

    mode: "bilinear" (antialiased when shrinking), "bilinear_fast" (no antialiasing) or "nearest".
    """
    g = geometry
    x, y = stack.shape[-2:]
    (wx, wy), (ox, oy) = g.window, g.origin
    window = F.pad(stack, (-oy, oy + wy - y, -ox, ox + wx - x))  # negative pads crop
    size = (g.image_size, g.image_size)
    if (wx, wy) == size:
        return window
    if mode == "nearest":
        return F.interpolate(window, size=size, mode="nearest")
    antialias = mode == "bilinear" and max(wx, wy) > g.image_size
    return F.interpolate(window, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def from_model_grid(maps: torch.Tensor, geometry: SliceGeometry, mode: str = "bilinear") -> torch.Tensor:
    """(N, C, S, S) -> (N, C, X, Y) on the native slice grid: resize back to the window, then put it in place."""
    g = geometry
    (wx, wy), (ox, oy) = g.window, g.origin
    if (wx, wy) != (g.image_size, g.image_size):
        if mode == "nearest":
            maps = F.interpolate(maps, size=(wx, wy), mode="nearest")
        else:
            maps = F.interpolate(maps, size=(wx, wy), mode="bilinear", align_corners=False)
    x, y = g.volume_shape[0], g.volume_shape[1]
    return F.pad(maps, (oy, y - oy - wy, ox, x - ox - wx))


def prepare_volume(data: np.ndarray, brain: np.ndarray | None, cfg: PreprocessConfig,
                   zooms: tuple[float, float, float]) -> PreparedVolume:
    """(X, Y, Z) RAS+ intensities with voxel sizes `zooms` (mm, RAS+ order; + optional brain mask) -> model slices,
    brain slices, geometry.

    Intensities are scaled and masked, blurred to `cfg.resolution_mm` along every finer axis, sampled at axial
    planes `cfg.pixel_mm` apart and cut to the window: one physical sampling and resolution for every file.
    """
    if brain is None:
        brain = auto_brain_mask(data)
    scale = intensity_scale(data, brain, cfg.percentile)
    geometry = _geometry(brain, select_slices(brain, cfg), zooms, cfg)
    image = np.clip(data.astype(np.float32) / np.float32(scale), 0.0, 1.0) * brain
    sx, sy, sz = blur_sigmas(zooms, cfg.resolution_mm)
    if sz > 0 and geometry.n_slices > 1:
        image = ndimage.gaussian_filter1d(image, sz, axis=2, mode="constant", truncate=3.0)
    planes = sample_slices(image, geometry.positions)
    for axis, sigma in ((1, sx), (2, sy)):
        if sigma > 0:
            planes = ndimage.gaussian_filter1d(planes, sigma, axis=axis, mode="constant", truncate=3.0)
    inside = sample_slices(brain, geometry.positions) >= 0.5
    planes *= inside  # blur spilled past the brain: dropped, so the file's own edges cannot matter
    slices = to_model_grid(torch.from_numpy(planes)[:, None], geometry).clamp_(0.0, 1.0)
    # the mask only needs its 0.5 level set: plain bilinear is exact enough and far cheaper than antialiasing
    mask = torch.from_numpy(inside.astype(np.float32))[:, None]
    brain_slices = (to_model_grid(mask, geometry, mode="bilinear_fast") >= 0.5).float()
    return PreparedVolume(slices=slices, brain=brain_slices, geometry=geometry, scale=scale)


def slices_of(volume: np.ndarray, geometry: SliceGeometry, mode: str = "bilinear") -> torch.Tensor:
    """The model slices of another array on the same grid (a lesion mask, say): (N, 1, S, S)."""
    stack = torch.from_numpy(sample_slices(volume, geometry.positions))[:, None]
    return to_model_grid(stack, geometry, mode=mode)


def restore_volume(maps: torch.Tensor, geometry: SliceGeometry, fill: float = 0.0,
                   mode: str = "bilinear") -> np.ndarray:
    """(N, 1, S, S) model-grid maps -> (X, Y, Z) float32 on the native RAS+ grid: in-plane back to the window,
    then linear between the model slices onto the covered native slices; other slices hold `fill`."""
    out = np.full(geometry.volume_shape, fill, dtype=np.float32)
    covered = geometry.covered
    if geometry.n_slices == 0 or covered.size == 0:
        return out
    native = from_model_grid(maps.detach().float().cpu(), geometry, mode=mode)[:, 0].numpy()
    if geometry.n_slices == 1:
        out[:, :, covered] = native[0][:, :, None]
        return out
    step = float(geometry.positions[1] - geometry.positions[0])
    t = np.clip((covered - geometry.positions[0]) / step, 0.0, geometry.n_slices - 1)
    below = np.minimum(np.floor(t).astype(np.int64), geometry.n_slices - 2)
    weight = (t - below).astype(np.float32)
    if mode == "nearest":
        weight = (weight >= 0.5).astype(np.float32)
    mixed = native[below] * (1.0 - weight)[:, None, None] + native[below + 1] * weight[:, None, None]
    out[:, :, covered] = np.moveaxis(mixed, 0, 2)
    return out
