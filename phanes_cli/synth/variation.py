"""Realistic between-subject and between-scan variation of a template.

Two independent parts, each driven by its own random generator:
- anatomy (`sample_anatomy`): one random affine (rotation, head size, per-axis shape, shift) composed with
  a smooth elastic displacement (individual gyral shape and cortical thickness) and a radial
  magnification around the ventricles (ventricle size), applied in a single interpolation from the
  template's own grid onto the subject's isotropic output grid; the brain mask and tissue map follow
  the same transform. Then atrophy (`atrophy`) widens the CSF spaces: sulci, ventricles, brain edge.
- acquisition (`acquire`): grey/white contrast and gamma (sequence and field strength), a smooth
  multiplicative bias field, blur (resolution loss, sometimes a thick-slice axis), Rician noise,
  skull-stripped background and a global scanner gain.
The ranges are set so that the five source brains, which are mostly young adults and population
averages, reach across what adult cohorts show (see `VariationConfig`).

Lesions are inserted between the two, into the anatomy, so that they go through the same scanner
effects as the tissue around them; the same acquisition generator on the lesion-free anatomy gives
the exact healthy base of a lesion subject (same noise draw), which is what the tests compare to.
Written with numpy/scipy rather than torchio: one interpolation for all spatial changes and separable
fields keep a subject at about a second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phanes_cli.synth.templates import Grid, Template


@dataclass(frozen=True)
class VariationConfig:
    """Ranges of the random variation; each stays within what real adult T1 cohorts show."""

    rotation_deg: float = 6.0  # max absolute rotation about each axis (head position)
    # head size: one isotropic factor in [1 - s, 1 + s]; +-9% linear spans the adult intracranial volume
    # range (about 1100-1800 mL, a factor 1.6 in volume, 1.18 linear)
    head_scale: float = 0.09
    scale: float = 0.04  # per-axis scale in [1 - scale, 1 + scale] on top: head shape (long / round heads)
    translation_mm: float = 4.0
    # elastic displacement std, drawn per subject in this range (mm): individual gyral shape and, through
    # local stretching and compression, cortical thickness differences of a few tenths of a mm
    elastic_mm: tuple[float, float] = (1.0, 3.5)
    control_spacing_mm: float = 24.0
    # ventricle size: magnification at the ventricles' centre, log-uniform in this range, fading with
    # a Gaussian of `ventricle_sigma_mm`; ventricular volume varies several-fold between adults and
    # grows with age, so up to 1.6x linear (4x in volume) and down to 0.85x
    ventricle_scale: tuple[float, float] = (0.85, 1.6)
    ventricle_sigma_mm: float = 22.0
    # atrophy: fraction in [0, max] of a one-voxel widening of CSF spaces (sulci, ventricles, brain edge),
    # i.e. cortex thinned from outside and sulci opened, as in ageing and neurodegeneration
    atrophy: float = 0.8
    gamma_log_std: float = 0.15  # contrast: intensity ** exp(N(0, std))
    # grey/white contrast: v + k v (1 - v) with k uniform in +-this (WM stays 1, GM ~0.7 moves by +-0.06):
    # MPRAGE vs SPGR, inversion time and field strength change GM/WM contrast this much
    gm_contrast: float = 0.3
    bias_log_std: tuple[float, float] = (0.03, 0.2)  # std over the brain of the log bias field (coil profiles)
    bias_order: int = 3
    blur_sigma_vox: float = 0.7  # max isotropic-ish blur per axis, in output voxels
    thick_slice_probability: float = 0.3
    thick_slice_sigma_vox: tuple[float, float] = (0.9, 1.3)
    noise_std: tuple[float, float] = (0.01, 0.035)  # Rician noise std, relative to white matter
    gain: tuple[float, float] = (300.0, 3000.0)  # scanner units, log-uniform


@dataclass(frozen=True)
class Anatomy:
    """A subject's anatomy on its output grid, before scanner effects."""

    image: np.ndarray  # (X, Y, Z) float32, white matter ~ 1
    brain: np.ndarray  # (X, Y, Z) bool
    tissue: np.ndarray  # (X, Y, Z) float32 grey/white-matter probability
    source_world: np.ndarray  # (3, X, Y, Z) float32 template world mm sampled at each voxel
    grid: Grid


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bspline_matrix(n: int, controls: int) -> np.ndarray:
    """(n, controls) cubic B-spline weights spreading `controls` knots evenly over n samples."""
    u = np.linspace(0.0, controls - 1.0, n)[:, None] - np.arange(controls)[None, :]
    a = np.abs(u)
    w = np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return w / w.sum(axis=1, keepdims=True)


def smooth_field(shape: tuple[int, int, int], values: np.ndarray) -> np.ndarray:
    """Cubic B-spline field from control values (C, cx, cy, cz), evaluated separably: (C, X, Y, Z) float32."""
    bx, by, bz = (_bspline_matrix(n, c).astype(np.float32) for n, c in zip(shape, values.shape[1:], strict=True))
    field = values.astype(np.float32) @ bz.T  # (C, cx, cy, Z)
    field = np.einsum("yb,cabz->cayz", by, field)  # (C, cx, Y, Z)
    channels, cx = field.shape[:2]
    return np.matmul(bx, field.reshape(channels, cx, -1)).reshape(channels, *shape)


def ventricle_centre(template: Template) -> np.ndarray:
    """World centre (mm) of the lateral ventricles: the CSF-dark brain voxels of the brain box's central fifth."""
    inner = template.brain > 0.5
    box = np.argwhere(inner)
    lo, hi = box.min(0), box.max(0)
    middle = tuple(slice(int(a + 0.4 * (b - a)), int(a + 0.6 * (b - a)) + 1) for a, b in zip(lo, hi, strict=True))
    dark = np.argwhere(inner[middle] & (template.image[middle] < 0.5))
    start = np.array([m.start for m in middle], dtype=np.float64)
    centre = start + (dark.mean(0) if len(dark) else (np.array([m.stop - m.start for m in middle]) - 1) / 2)
    return np.asarray(template.affine[:3, :3] @ centre + template.affine[:3, 3], dtype=np.float32)


def _ventricle_warp(source: np.ndarray, centre: np.ndarray, magnification: float, sigma_mm: float) -> np.ndarray:
    """Radial map c + (p - c) * (1 - a g(|p - c|)), a = 1 - 1/magnification, g Gaussian: magnifies near c.

    Invertible (monotone in the radius) for magnification in [0.85, 1.6]; in place on (3, X, Y, Z).
    """
    offset = source - centre[:, None, None, None]
    g = np.exp(-(offset**2).sum(0) / (2.0 * sigma_mm**2))
    offset *= 1.0 - (1.0 - 1.0 / magnification) * g
    return offset + centre[:, None, None, None]


def atrophy(image: np.ndarray, brain: np.ndarray, amount: float) -> np.ndarray:
    """Widen CSF by up to one voxel: voxels whose 3x3x3 minimum is CSF-dark move `amount` of the way to it."""
    eroded = ndimage.grey_erosion(image, size=(3, 3, 3))
    return np.where(brain & (eroded < 0.45), image - amount * (image - eroded), image).astype(np.float32)


def sample_anatomy(template: Template, grid: Grid, rng: np.random.Generator, cfg: VariationConfig) -> Anatomy:
    """Warp the template onto `grid` through a random affine + elastic + ventricle transform (one interpolation)."""
    lo, hi = template.brain_box_world
    centre = (lo + hi) / 2
    head = rng.uniform(1 - cfg.head_scale, 1 + cfg.head_scale)
    linear = _rotation(np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))) @ np.diag(
        head * rng.uniform(1 - cfg.scale, 1 + cfg.scale, 3)
    )
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    extent = np.array(grid.shape) * grid.voxel_size
    controls = tuple(int(max(4, np.ceil(e / cfg.control_spacing_mm) + 1)) for e in extent)
    # B-spline smoothing shrinks the control values' variance; rescale so the field's std is the drawn elastic std
    source = smooth_field(grid.shape, rng.standard_normal((3, *controls)))
    source *= rng.uniform(*cfg.elastic_mm) / max(float(source.std()), 1e-6)
    # source world = linear @ (world - centre) + centre + shift + displacement, built axis by axis
    source += (centre + shift - linear @ centre).astype(np.float32)[:, None, None, None]
    for axis, n in enumerate(grid.shape):
        coords = (grid.affine[axis, 3] + grid.voxel_size * np.arange(n)).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = n
        source += linear[:, axis].astype(np.float32)[:, None, None, None] * coords.reshape(view)[None]
    magnification = float(np.exp(rng.uniform(*np.log(cfg.ventricle_scale))))
    if magnification != 1.0:
        source = _ventricle_warp(source, ventricle_centre(template), magnification, cfg.ventricle_sigma_mm)
    inv = np.linalg.inv(template.affine).astype(np.float32)
    vox = np.tensordot(inv[:3, :3], source, axes=1) + inv[:3, 3][:, None, None, None]

    brain = ndimage.map_coordinates(template.brain, vox, order=1, mode="constant", cval=0.0, output=np.float32) >= 0.5
    inside = vox[:, brain]  # image and tissue are zero outside the brain: sample only the brain's voxels

    def sample(volume: np.ndarray) -> np.ndarray:
        out = np.zeros(grid.shape, dtype=np.float32)
        out[brain] = ndimage.map_coordinates(volume, inside, order=1, mode="constant", cval=0.0, output=np.float32)
        return out

    image = atrophy(sample(template.image), brain, float(rng.uniform(0.0, cfg.atrophy)))
    return Anatomy(image=image, brain=brain, tissue=sample(template.tissue), source_world=source, grid=grid)


def bias_field(shape: tuple[int, int, int], brain: np.ndarray, rng: np.random.Generator,
               cfg: VariationConfig) -> np.ndarray:
    """Smooth multiplicative field exp(polynomial) with mean 1 log-centred on the brain, (X, Y, Z) float32."""
    order = cfg.bias_order + 1
    powers = [(i, j, k) for i in range(order) for j in range(order - i) for k in range(order - i - j) if i + j + k > 0]
    coeffs = np.zeros((order, order, order))
    for c, power in zip(rng.standard_normal(len(powers)), powers, strict=True):
        coeffs[power] = c
    # sum of c_ijk x^i y^j z^k, evaluated separably with one Vandermonde matrix per axis
    log_field = coeffs
    for axis, n in enumerate(shape):
        vander = np.vander(np.linspace(-1.0, 1.0, n), order, increasing=True)  # (n, order)
        log_field = np.moveaxis(np.tensordot(vander, np.moveaxis(log_field, axis, 0), axes=1), 0, axis)
    inside = log_field[brain]
    target = rng.uniform(*cfg.bias_log_std)
    log_field = (log_field - inside.mean()) * (target / max(float(inside.std()), 1e-6))
    return np.exp(log_field).astype(np.float32)


def acquire(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator, cfg: VariationConfig) -> np.ndarray:
    """Scanner effects on an anatomy image (X, Y, Z), white matter ~ 1 -> float32 in scanner units."""
    k = rng.uniform(-cfg.gm_contrast, cfg.gm_contrast)
    contrast = np.clip(image + np.float32(k) * image * (1.0 - image), 0.0, None)  # monotone for |k| < 0.5
    gamma = float(np.exp(rng.normal(0.0, cfg.gamma_log_std)))
    out = np.power(contrast, gamma, dtype=np.float32)
    out *= bias_field(image.shape, brain, rng, cfg)
    sigma = rng.uniform(0.0, cfg.blur_sigma_vox, 3)
    if rng.random() < cfg.thick_slice_probability:
        sigma[rng.integers(3)] = rng.uniform(*cfg.thick_slice_sigma_vox)
    out = ndimage.gaussian_filter(out, sigma=sigma, truncate=3.0)
    noise = rng.uniform(*cfg.noise_std)
    real = out + np.asarray(rng.normal(0.0, noise, out.shape), dtype=np.float32)
    imag = np.asarray(rng.normal(0.0, noise, out.shape), dtype=np.float32)
    out = np.sqrt(real * real + imag * imag) * brain
    gain = float(np.exp(rng.uniform(np.log(cfg.gain[0]), np.log(cfg.gain[1]))))
    return (out * gain).astype(np.float32)
