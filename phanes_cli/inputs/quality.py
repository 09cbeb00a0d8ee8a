"""Input quality checks: catch volumes that load fine but would give a normal-looking, wrong result.

`check_volume(volume, brain)` returns quality-control flag names (`FLAGS` says what each means). Flags in
`FATAL` fail the volume: there is nothing to screen. The others are warnings for a `qc_flags` column: the
volume is screened, but its numbers deserve a look. Each limit below is set between what real T1 brains
measure and what the failure it catches measures; docs/quality_checks.md gives the figures behind each one.
The spatial checks (noise, skull, T1 plausibility) run on every n-th voxel, n = floor(3 mm / voxel size)
per axis, so a 1 mm head costs about half a second on one core.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from phanes_cli.core.volume_io import Volume

BRAIN_ML = (800.0, 2200.0)
MIN_NEIGHBOUR_CORRELATION = 0.2
VOXEL_MM = (0.25, 3.0)
MAX_ANISOTROPY = 4.0
CORE_DEPTH_MM = 20.0
TISSUE_LEVEL = 0.4  # x core median: above CSF and bone, below grey matter, fat and muscle on T1
MAX_TISSUE_OUTSIDE = 0.2
MIN_TISSUE_UNDER_SURFACE = 0.75
SHELL_MM, DEEP_MM = 3.5, 12.0  # T1 plausibility: the cortex layer and the (white matter) deep part
MAX_SHELL_TO_DEEP = 1.0
MAX_DEPTH_EXPLAINED = 0.8  # anatomy varies within a depth ring; a smooth phantom only from ring to ring
DEPTH_RING_MM = 3.0
MIN_BRIGHT_DEPTH = 1.15  # T1's brightest tissue (white matter) lies deeper than its middle one (grey matter)
FLATTEN_MM = 15.0  # the local mean that removes a bias field before intensity classes are drawn
MIN_ELONGATION = 1.15  # a brain is longer than it is wide or high; a ball measures 1.0
# Negative voxels per brain voxel above which intensities are standardised (z-scored: about half the brain below
# 0), not raw MR magnitudes, which the model was trained and calibrated on; real T1 scans in ../shared/data
# measure 0-0.002 (interpolation ringing). Counted over the whole image: a threshold mask leaves the negative
# half of a z-scored brain out.
MAX_NEGATIVE_SHARE = 0.05
GRID_MM = 3.0  # the spatial checks run on a ~3 mm subgrid: ~25x cheaper on 1 mm data, same answers at these limits

FLAGS = {
    "zero_voxel_size": "a voxel size is 0 or not finite",
    "all_zero": "every voxel is 0",
    "constant": "every voxel has the same value",
    "empty_brain_mask": "the brain mask holds no voxel",
    "brain_volume_low": f"brain volume below {BRAIN_ML[0]:.0f} mL",
    "brain_volume_high": f"brain volume above {BRAIN_ML[1]:.0f} mL",
    "intensity_noise": f"neighbouring brain voxels correlate below {MIN_NEIGHBOUR_CORRELATION} (pure noise?)",
    "voxel_too_large": f"a voxel side above {VOXEL_MM[1]} mm (thick slices)",
    "voxel_too_small": f"a voxel side below {VOXEL_MM[0]} mm (unit error?)",
    "voxel_anisotropic": f"largest / smallest voxel side above {MAX_ANISOTROPY:g}",
    "no_affine": "no qform or sform: orientation assumed",
    "skull_present": "skull and scalp appear to be present (not skull-stripped)",
    "not_t1_brain": "not a T1-weighted brain: no white > grey matter > CSF contrast, no anatomy, or not brain-shaped",
    "negative_intensities": "many voxels are negative (z-scored or otherwise standardised intensities?): the model "
                            "knows raw MR intensities, lesion burden unreliable; give the scanner's intensities",
}
FATAL = frozenset({"zero_voxel_size", "all_zero", "constant", "empty_brain_mask"})


def check_volume(volume: Volume, brain: np.ndarray, brain_source: str = "threshold") -> list[str]:
    """QC flag names of one volume (RAS+ data) and its bool brain mask, fatal ones first; [] when clean.

    `brain_source`: where the mask came from (file, model or threshold: inputs.brain_masks); the skull check
    applies to threshold masks only.
    """
    zooms = np.asarray(volume.zooms, dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        return ["zero_voxel_size"]
    data = volume.data
    low, high = float(data.min()), float(data.max())
    if low == high:
        return ["all_zero" if high == 0 else "constant"]
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        return ["empty_brain_mask"]
    flags = _voxel_flags(zooms)
    if int(volume.header["qform_code"]) == 0 and int(volume.header["sform_code"]) == 0:
        flags.append("no_affine")
    brain_ml = float(brain.sum()) * float(np.prod(zooms)) / 1000.0
    if brain_ml < BRAIN_ML[0]:
        flags.append("brain_volume_low")
    elif brain_ml > BRAIN_ML[1]:
        flags.append("brain_volume_high")
    if np.count_nonzero(data < 0) > MAX_NEGATIVE_SHARE * np.count_nonzero(brain):
        flags.append("negative_intensities")
    step = np.maximum(1, np.floor(GRID_MM / zooms)).astype(int)
    grid = tuple(slice(None, None, int(s)) for s in step)
    if neighbour_correlation(data[grid], brain[grid]) < MIN_NEIGHBOUR_CORRELATION:
        flags.append("intensity_noise")
    elif brain_source == "threshold" and skull_present(data[grid], brain[grid], zooms * step):
        flags.append("skull_present")
    elif not t1_plausible(data[grid], brain[grid], zooms * step):
        flags.append("not_t1_brain")
    return flags


def _voxel_flags(zooms: np.ndarray) -> list[str]:
    flags = []
    if zooms.max() > VOXEL_MM[1]:
        flags.append("voxel_too_large")
    if zooms.min() < VOXEL_MM[0]:
        flags.append("voxel_too_small")
    if zooms.max() / zooms.min() > MAX_ANISOTROPY:
        flags.append("voxel_anisotropic")
    return flags


def neighbour_correlation(data: np.ndarray, brain: np.ndarray) -> float:
    """Mean over the axes of the Pearson correlation between brain voxels and their next neighbour.

    A constant brain (no variance) counts as uncorrelated; so does a brain too thin to hold pairs.
    Intensities are clipped to the brain's 0.5-99.5th percentiles first: one 1e30 voxel in a clean brain
    would otherwise dominate every product and read as noise.
    """
    inner = data[brain]
    if inner.size:
        low, high = np.percentile(inner, [0.5, 99.5])
        data = np.clip(data, low, high)
    values = []
    for axis in range(3):
        a, m = np.moveaxis(data, axis, 0), np.moveaxis(brain, axis, 0)
        pair = m[:-1] & m[1:]
        x, y = a[:-1][pair].astype(np.float64), a[1:][pair].astype(np.float64)
        if x.size > 2 and x.std() > 0 and y.std() > 0:
            values.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(values)) if values else 0.0


class T1Figures(NamedTuple):
    """The four figures of the T1 plausibility check (`quality` docstring: what each measures, and why).

    NaN means not assessed (too few deep voxels or an empty intensity class): it flags nothing.
    """

    layer_ratio: float  # outer 3.5 mm median / deep median, from the brain's 0.5th percentile; T1 below 1
    depth_share: float  # share of the intensity variance that 3 mm depth rings explain; anatomy below 0.8
    bright_depth: float  # median depth of the brightest of three intensity classes / of the middle one; T1 above 1.15
    elongation: float  # longest / shortest principal axis of the brain mask; a brain above 1.15, a ball 1.0

    def plausible(self) -> bool:
        """True unless one figure is past its limit (NaN passes)."""
        return not (self.layer_ratio >= MAX_SHELL_TO_DEEP or self.depth_share >= MAX_DEPTH_EXPLAINED
                    or self.bright_depth < MIN_BRIGHT_DEPTH or self.elongation < MIN_ELONGATION)


def t1_figures(data: np.ndarray, brain: np.ndarray, zooms: np.ndarray) -> T1Figures:
    """The T1 plausibility figures of a brain (bool mask) on a grid of `zooms` mm voxels.

    Intensities are clipped to the brain's 0.5-99.5th percentiles and counted from the lower one, so no
    figure changes with an offset, a scale (z-scored data) or one extreme voxel.
    """
    zooms = np.asarray(zooms, dtype=np.float64)
    depth = ndimage.distance_transform_edt(brain, sampling=zooms)
    low, high = np.percentile(data[brain], [0.5, 99.5])
    image = np.where(brain, np.clip(data, low, high) - low, 0.0)
    ratio, share = _layering(image[brain], depth[brain])
    return T1Figures(ratio, share, _bright_class_depth(image, brain, depth, zooms), _elongation(brain, zooms))


def _layering(values: np.ndarray, depth: np.ndarray) -> tuple[float, float]:
    """(outer layer / deep median ratio, share of the variance explained by depth rings)."""
    _, rings = np.unique(np.round(depth / DEPTH_RING_MM), return_inverse=True)
    ring_means = np.bincount(rings, values) / np.bincount(rings)
    total = float(values.var())
    share = 1.0 if total == 0 else 1.0 - float(((values - ring_means[rings]) ** 2).mean()) / total
    shell, deep = depth <= SHELL_MM, depth > DEEP_MM
    if not deep.any() or not shell.any():
        return float("nan"), share
    deep_level = float(np.median(values[deep]))
    return (float(np.median(values[shell])) / deep_level if deep_level > 0 else float("inf")), share


def _bright_class_depth(image: np.ndarray, brain: np.ndarray, depth: np.ndarray, zooms: np.ndarray) -> float:
    """Median depth of the brightest of three intensity classes over that of the middle class.

    The image is first divided by its local mean (a Gaussian of FLATTEN_MM over the brain), so a scanner's
    smooth bias field does not decide which voxels count as bright.
    """
    sigma = FLATTEN_MM / zooms
    local = ndimage.gaussian_filter(image, sigma) / np.maximum(ndimage.gaussian_filter(brain * 1.0, sigma), 1e-6)
    values = image[brain] / np.maximum(local[brain], 1e-6 * float(local[brain].max()) + 1e-30)
    classes = three_classes(np.clip(values, *np.percentile(values, [0.5, 99.5])))
    middle, bright = depth[brain][classes == 1], depth[brain][classes == 2]
    if not middle.size or not bright.size or np.median(middle) == 0:
        return float("nan")
    return float(np.median(bright) / np.median(middle))


def three_classes(values: np.ndarray, steps: int = 30) -> np.ndarray:
    """Class 0, 1 or 2 (dark to bright) of each value: 1-D k-means from the 10th, 50th and 90th percentiles."""
    centres = np.percentile(values, [10.0, 50.0, 90.0])
    classes = np.zeros(values.shape, dtype=np.int64)
    for _ in range(steps):
        classes = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        counts = np.bincount(classes, minlength=3)
        if np.any(counts == 0):
            break
        updated = np.bincount(classes, values, minlength=3) / counts
        if np.allclose(updated, centres):
            break
        centres = updated
    return classes


def _elongation(brain: np.ndarray, zooms: np.ndarray) -> float:
    """Longest over shortest principal axis (square root of the eigenvalues) of the mask's voxel positions."""
    points = np.argwhere(brain) * zooms
    if len(points) < 4:
        return float("nan")
    spread = np.linalg.eigvalsh(np.cov(points.T))
    return float(np.sqrt(spread[-1] / spread[0])) if spread[0] > 0 else float("inf")


def t1_plausible(data: np.ndarray, brain: np.ndarray, zooms: np.ndarray) -> bool:
    """False when the brain lacks T1 contrast (white > grey matter > CSF, inward) or a brain's anatomy and shape."""
    return t1_figures(data, brain, zooms).plausible()


def skull_present(data: np.ndarray, brain: np.ndarray, zooms: np.ndarray) -> bool:
    """Tissue in a shell 5-20 mm outside the mask, or a dark (skull) layer 4-12 mm under its upper surface."""
    depth = ndimage.distance_transform_edt(brain, sampling=zooms)
    core = depth > CORE_DEPTH_MM
    if not core.any():
        return False
    tissue = data > TISSUE_LEVEL * float(np.median(data[core]))
    gap = ndimage.distance_transform_edt(~brain, sampling=zooms)
    outside = (gap > 5.0) & (gap <= 20.0)
    if outside.any() and float(tissue[outside].mean()) > MAX_TISSUE_OUTSIDE:
        return True
    extent = np.flatnonzero(brain.any(axis=(0, 1)))
    upper = np.zeros_like(brain)
    upper[:, :, (extent[0] + extent[-1]) // 2 :] = True  # RAS+: axis 2 runs inferior -> superior
    layer = brain & upper & (depth > 4.0) & (depth <= 12.0)
    return bool(layer.any()) and float(tissue[layer].mean()) < MIN_TISSUE_UNDER_SURFACE
