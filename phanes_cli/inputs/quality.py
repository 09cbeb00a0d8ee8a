"""Input quality checks: catch volumes that load fine but would give a normal-looking, wrong result.

`check_volume(volume, brain)` returns quality-control flag names (`FLAGS` says what each means). Flags in
`FATAL` fail the volume: there is nothing to screen. The others are warnings for a `qc_flags` column:
the volume is screened, but its numbers deserve a look. The limits, and why:

- brain volume 800-2200 mL (`brain_volume_low` / `brain_volume_high`). Adult intracranial volume is
  about 1100-1900 mL; skull-stripped healthy brains and templates here measure 1000-1900 mL, resected
  glioma brains down to 1000 mL. Below 800 mL the scan covers part of the brain, is a child's, or has a
  wrong voxel size; above 2200 mL the mask holds skull, neck or face (a real head measures ~3400 mL).
- intensity: an all-zero or constant volume, or an empty brain mask, is fatal. `intensity_noise`: the
  correlation of neighbouring brain voxels on the ~3 mm check grid (mean over the three axes) is below
  0.2. Anatomy is spatially smooth: real T1 scans measure 0.61-0.81, a template with added noise of 15%
  of its maximum still 0.32, while independent noise measures 0.00 whatever its distribution.
- voxel size: any axis above 3.0 mm (`voxel_too_large`: thick slices, where lesions of a few mm fall into
  one partial-volume voxel; 0.5x0.5x6 mm is flagged), below 0.25 mm (`voxel_too_small`: finer than brain
  MRI acquires, usually a unit error), or largest/smallest above 4 (`voxel_anisotropic`: a 2D
  thick-slice acquisition). A voxel size of 0 or non-finite is fatal. `no_affine`: the file has neither a
  qform nor an sform, so its orientation is a guess.
- `skull_present`: skull stripping was skipped, so the automatic (threshold) brain mask screening uses holds
  or borders skull and scalp. Assessed only for that mask: a brain mask from a file or from brain extraction
  (deepbet) already leaves skull and scalp out, whatever the image still holds, and a tight mask has sulcal CSF
  under its surface, which sign (2) would read as skull (on the real heads in ../shared/data, deepbet's masks
  measure 24-43% tissue outside, the signs of the image's scalp, not of a mask problem). Two signs, either is
  enough. (1) Outside the mask:
  more than 20% of the voxels 5-20 mm outside it hold tissue (above 0.4 x the median of the brain's
  core, the voxels deeper than 20 mm); a stripped image has none there, even when its mask is a few mm
  tight, while scalp lies 8-15 mm out. (2) Inside an automatic
  mask, which then covers the whole head: in the upper half of the brain, the layer 4-12 mm below the
  mask surface is less than 75% tissue, because skull and CSF lie there under the scalp. Stripped brains
  measure 0.91-1.00 there, the real head 0.52. Not assessed when no voxel lies 20 mm deep.

- `not_t1_brain` (warning): the image does not look like a T1-weighted brain. Four figures, any one past its
  limit is enough (intensities clipped to the brain's 0.5-99.5th percentiles and counted from the lower one,
  so offset, scale and one extreme voxel change nothing):
  (1) layering: T1 orders white matter > grey matter > CSF, so the brain's outer 3.5 mm (cortex, sulcal CSF)
  is darker than its part over 12 mm deep (mostly white matter); flagged when the ratio of their medians
  reaches 1.0. Catches CSF-bright contrasts (T2, proton density, inverted T1) and uniform phantoms.
  (2) depth share: anatomy varies within each 3 mm depth ring (gyri, sulci, ventricles); flagged when depth
  alone explains 80% of the intensity variance: smooth, graded or shelled phantoms.
  (3) bright depth: the brain's intensities fall into three classes (1-D k-means: CSF, grey, white matter on
  T1), after dividing out the local mean over 15 mm so a bias field does not decide them; on T1 the
  brightest class (white matter) lies deeper than the middle one (cortex), so the ratio of their median
  depths is above 1; flagged below 1.15. Catches contrasts with grey matter brighter than white (FLAIR,
  CT, also T2 and proton density) and textured phantoms without layering (~1.0).
  (4) elongation: a brain is longer than it is wide or high; flagged when the longest / shortest principal
  axis of the brain mask is below 1.15 (a ball measures 1.0, whatever it holds).
  Measured (`benchmarks/t1_plausibility.py`) on every real brain in ../shared/data and the shipped ones (18
  images: healthy, glioma patients, the heads through their model brain mask, MNI152; each 1 mm one also
  with 2x2x2, 1x1x3 and 1x1x5 mm voxels) and on T1-like subjects of the 20 shipped label maps (also at those
  voxel sizes): none flagged; layering 0.17-0.77, depth share 0.07-0.55, bright depth 1.28-1.95, elongation
  1.27-1.95. Flagged: every inverted real brain (layering 1.62-3.78), the label maps as T2 (layering
  2.54-3.87), proton density (1.10-1.42), FLAIR and CT (bright depth 0.63-0.83 down to 1x1x3 and 2x2x2 mm;
  with 5 mm slices 18 of 20 FLAIR and every CT, those slices being flagged `voxel_too_large` anyway), CT
  heads in Hounsfield units through the automatic mask, balls (elongation 1.0) and textured or shelled
  brain-sized ellipsoids (bright depth 0.57-1.02). Not caught, by design of simple figures: a phantom
  with a brain's outline that copies T1's layering (dark rim, grey, bright inside) with texture. A warning,
  not fatal: real T1 scans unlike the measured ones (infants, whose white matter is still dark; contrast
  agents) are unmeasured, and a fatal flag has no override; the flag stands beside the lesion burden in
  `qc_flags` and the log. Not assessed with `skull_present` (the mask then holds the bright scalp); a figure
  that cannot be computed (no voxel 12 mm deep, an empty intensity class) flags nothing.

The spatial checks (noise, skull, T1 plausibility) run on every n-th voxel, n = floor(3 mm / voxel size) per axis:
about 0.5 s for a 1 mm head on one core.
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
