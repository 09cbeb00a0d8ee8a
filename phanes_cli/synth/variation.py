"""Realistic between-subject and between-scan variation of a template.

Two independent parts, each driven by its own random generator:
- anatomy (`sample_anatomy`): one small random affine (rotation, per-axis scale, shift) composed with a
  smooth elastic displacement, applied in a single interpolation from the template's own grid onto
  the subject's isotropic output grid; the brain mask and tissue map follow the same transform.
- acquisition (`acquire`): gamma contrast, a smooth multiplicative bias field, blur (resolution loss,
  sometimes a thick-slice axis), Rician noise, skull-stripped background and a global scanner gain.

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
    """Ranges of the random variation; defaults stay within what real T1 cohorts show."""

    rotation_deg: float = 6.0  # max absolute rotation about each axis
    scale: float = 0.06  # per-axis scale drawn in [1 - scale, 1 + scale]: head size and shape
    translation_mm: float = 4.0
    elastic_mm: float = 2.5  # std of the elastic displacement at control points
    control_spacing_mm: float = 30.0
    gamma_log_std: float = 0.12  # contrast: intensity ** exp(N(0, std))
    bias_log_std: tuple[float, float] = (0.03, 0.15)  # std over the brain of the log bias field
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
    bx, by, bz = (_bspline_matrix(n, c).astype(np.float32) for n, c in zip(shape, values.shape[1:]))
    field = values.astype(np.float32) @ bz.T  # (C, cx, cy, Z)
    field = np.einsum("yb,cabz->cayz", by, field)  # (C, cx, Y, Z)
    channels, cx = field.shape[:2]
    return np.matmul(bx, field.reshape(channels, cx, -1)).reshape(channels, *shape)


def sample_anatomy(template: Template, grid: Grid, rng: np.random.Generator, cfg: VariationConfig) -> Anatomy:
    """Warp the template onto `grid` through a random affine + elastic transform (one interpolation)."""
    lo, hi = template.brain_box_world
    centre = (lo + hi) / 2
    linear = _rotation(np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))) @ np.diag(
        rng.uniform(1 - cfg.scale, 1 + cfg.scale, 3)
    )
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    extent = np.array(grid.shape) * grid.voxel_size
    controls = tuple(int(max(4, np.ceil(e / cfg.control_spacing_mm) + 1)) for e in extent)
    # B-spline smoothing shrinks the control values' variance; rescale so the field's std is elastic_mm
    source = smooth_field(grid.shape, rng.standard_normal((3, *controls)))  # type: ignore[arg-type]
    source *= cfg.elastic_mm / max(float(source.std()), 1e-6)
    # source world = linear @ (world - centre) + centre + shift + displacement, built axis by axis
    source += (centre + shift - linear @ centre).astype(np.float32)[:, None, None, None]
    for axis, n in enumerate(grid.shape):
        coords = (grid.affine[axis, 3] + grid.voxel_size * np.arange(n)).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = n
        source += linear[:, axis].astype(np.float32)[:, None, None, None] * coords.reshape(view)[None]
    inv = np.linalg.inv(template.affine).astype(np.float32)
    vox = np.tensordot(inv[:3, :3], source, axes=1) + inv[:3, 3][:, None, None, None]

    brain = ndimage.map_coordinates(template.brain, vox, order=1, mode="constant", cval=0.0, output=np.float32) >= 0.5
    inside = vox[:, brain]  # image and tissue are zero outside the brain: sample only the brain's voxels

    def sample(volume: np.ndarray) -> np.ndarray:
        out = np.zeros(grid.shape, dtype=np.float32)
        out[brain] = ndimage.map_coordinates(volume, inside, order=1, mode="constant", cval=0.0, output=np.float32)
        return out

    return Anatomy(image=sample(template.image), brain=brain, tissue=sample(template.tissue), source_world=source, grid=grid)


def bias_field(shape: tuple[int, int, int], brain: np.ndarray, rng: np.random.Generator, cfg: VariationConfig) -> np.ndarray:
    """Smooth multiplicative field exp(polynomial) with mean 1 log-centred on the brain, (X, Y, Z) float32."""
    order = cfg.bias_order + 1
    powers = [(i, j, k) for i in range(order) for j in range(order - i) for k in range(order - i - j) if i + j + k > 0]
    coeffs = np.zeros((order, order, order))
    for c, power in zip(rng.standard_normal(len(powers)), powers):
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
    gamma = float(np.exp(rng.normal(0.0, cfg.gamma_log_std)))
    out = np.power(np.clip(image, 0.0, None), gamma, dtype=np.float32)
    out *= bias_field(image.shape, brain, rng, cfg)  # type: ignore[arg-type]
    sigma = rng.uniform(0.0, cfg.blur_sigma_vox, 3)
    if rng.random() < cfg.thick_slice_probability:
        sigma[rng.integers(3)] = rng.uniform(*cfg.thick_slice_sigma_vox)
    out = ndimage.gaussian_filter(out, sigma=sigma, truncate=3.0)
    noise = rng.uniform(*cfg.noise_std)
    real = out + rng.normal(0.0, noise, out.shape).astype(np.float32)
    imag = rng.normal(0.0, noise, out.shape).astype(np.float32)
    out = np.sqrt(real * real + imag * imag) * brain
    gain = float(np.exp(rng.uniform(np.log(cfg.gain[0]), np.log(cfg.gain[1]))))
    return (out * gain).astype(np.float32)
