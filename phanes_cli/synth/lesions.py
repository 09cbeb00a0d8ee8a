"""Stroke-like lesions with exact ground truth, inserted into a subject's anatomy.

Every lesion starts as a binary shape S on the subject grid: either procedural (an ellipsoid roughened
by smooth noise, grown around a seed in grey/white matter to a target volume) or a real expert-drawn
stroke mask resampled from MNI space (`synth.lesion_bank`: the bank shipped with the package by default).
The blend weight w ramps smoothly from 1 inside to 0 across the
shape's surface (see `blend_weight`), and the image becomes x * (1 - w) + min(x, t) * w with t a
CSF-like target (20-45% of white matter, with a little smooth texture): a T1 hypo-intensity with a
soft border that never brightens anything.

Ground truth: mask = (w >= 0.5) & brain & tissue. Only voxels where the darkening is at least half
complete are lesion; the fading border (0 < w < 0.5) lies within 2 voxels of the mask. The tissue
restriction keeps mask voxels where the darkening is visible: a real mask reaching into a ventricle
would otherwise label CSF that the image cannot show as changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phanes_cli.errors import InputError
from phanes_cli.synth.lesion_bank import Shape, ShapeBank
from phanes_cli.synth.variation import Anatomy

TISSUE_THRESHOLD = 0.5


@dataclass(frozen=True)
class LesionConfig:
    """Ranges of the simulated strokes."""

    volume_ml: tuple[float, float] = (0.5, 80.0)  # per lesion, log-uniform
    count: tuple[int, int] = (1, 3)  # lesions per subject, inclusive
    border_mm: float = 1.5  # half-width of the soft border (also the shape's smoothing sigma)
    darkening: tuple[float, float] = (0.2, 0.45)  # lesion intensity as a fraction of white matter (CSF ~0.35)
    roughness: float = 0.35  # weight of the smooth noise against the ellipsoid distance
    max_elongation: float = 1.6
    shape_tries: int = 20  # real-shape picks before giving up on a subject


def allowed_region(anatomy: Anatomy) -> np.ndarray:
    """Where lesions may be: brain grey/white matter. (X, Y, Z) bool."""
    return anatomy.brain & (anatomy.tissue >= TISSUE_THRESHOLD)


def regularise(shape: np.ndarray, allowed: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Round corners and drop one-voxel spurs (Gaussian, >= 0.5), then cut to the allowed region."""
    return (ndimage.gaussian_filter(shape.astype(np.float32), sigma_vox, truncate=3.0) >= 0.5) & allowed


def blend_weight(core: np.ndarray, anatomy: Anatomy, cfg: LesionConfig) -> np.ndarray:
    """Soft-border weight (X, Y, Z) float32 in [0, 1] of a lesion core (bool, inside brain tissue).

    A smoothstep of the signed distance to the core's surface, 0.5 exactly on it: >= 0.5 on every
    core voxel, < 0.5 everywhere else, and 0 beyond `border_mm` (at most 1.5 voxels) outside, so
    the ground truth (weight >= 0.5) is the core and nothing 2 voxels or farther from it is touched.
    """
    weight = np.zeros(core.shape, dtype=np.float32)
    if not core.any():
        return weight
    idx = np.argwhere(core)
    lo = np.maximum(idx.min(0) - 3, 0)
    hi = np.minimum(idx.max(0) + 4, core.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    local = core[box]
    inside = ndimage.distance_transform_edt(local) - 0.5
    outside = ndimage.distance_transform_edt(~local) - 0.5
    signed = np.where(local, inside, -outside)
    ramp = min(cfg.border_mm / anatomy.grid.voxel_size, 1.5)
    t = np.clip(0.5 + signed / (2.0 * ramp), 0.0, 1.0)
    weight[box] = t * t * (3.0 - 2.0 * t)
    return weight


def ground_truth_mask(weight: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Ground truth from a blend weight: half-complete darkening, inside brain tissue. (X, Y, Z) bool."""
    return (weight >= 0.5) & allowed_region(anatomy)


def brain_depth(anatomy: Anatomy) -> np.ndarray:
    """Distance (mm) of every brain voxel to the brain surface, (X, Y, Z) float32.

    Computed on every second voxel and repeated back: seeding only needs depth to a few mm, at 1/8
    of the cost of the full-resolution transform.
    """
    padded = np.pad(anatomy.brain[::2, ::2, ::2], 1)
    coarse = ndimage.distance_transform_edt(padded, sampling=2 * anatomy.grid.voxel_size)[1:-1, 1:-1, 1:-1]
    full = coarse.astype(np.float32).repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return full[tuple(slice(0, n) for n in anatomy.grid.shape)] * anatomy.brain


def _seed_voxel(anatomy: Anatomy, depth: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A random tissue voxel deep enough that a lesion of this radius is not mostly cut off by the surface."""
    candidates = np.argwhere((anatomy.tissue > 0.8) & (depth >= min(0.5 * radius_mm + 3.0, 20.0)))
    if len(candidates) == 0:
        candidates = np.argwhere(allowed_region(anatomy))
    return candidates[rng.integers(len(candidates))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def procedural_shape(anatomy: Anatomy, volume_ml: float, rng: np.random.Generator, cfg: LesionConfig,
                     depth: np.ndarray | None = None) -> np.ndarray:
    """An irregular lesion core of about `volume_ml` in tissue. (X, Y, Z) bool.

    The score falls with the (randomly oriented, elongated) ellipsoidal distance from a seed and is
    roughened by smooth noise at a third of the lesion radius. The top-k scoring tissue voxels,
    regularised and reduced to their largest connected part, form the core; k starts at the target
    voxel count and is grown a few times to make up for what regularisation trims off small shapes.
    """
    vs = anatomy.grid.voxel_size
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)  # mm, sphere of that volume
    seed = _seed_voxel(anatomy, brain_depth(anatomy) if depth is None else depth, radius, rng)
    half = int(np.ceil((2.2 * radius + 3.0) / vs))
    lo = np.maximum(seed - half, 0)
    hi = np.minimum(seed + half + 1, anatomy.grid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    axes = [(np.arange(a, b) - s) * vs for a, b, s in zip(lo, hi, seed, strict=True)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, bx, by, bz) mm from the seed
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    elong = np.exp(rng.uniform(-np.log(cfg.max_elongation), np.log(cfg.max_elongation), 3))
    elong /= np.prod(elong) ** (1.0 / 3.0)
    local = np.tensordot(q.T, offsets, axes=1) / (radius * elong)[:, None, None, None]
    distance = np.sqrt((local**2).sum(0))
    noise = ndimage.gaussian_filter(rng.standard_normal(distance.shape).astype(np.float32), max(radius / 3.0 / vs, 1.0))
    noise /= max(float(noise.std()), 1e-6)
    allowed = allowed_region(anatomy)[box]
    order = np.argsort(-np.where(allowed, -distance + cfg.roughness * noise, -np.inf), axis=None)[: int(allowed.sum())]
    target = volume_ml * 1000.0 / vs**3
    k = max(1, round(target))
    shape = np.zeros(anatomy.grid.shape, dtype=bool)
    for _ in range(5):
        chosen = np.zeros(distance.size, dtype=bool)
        chosen[order[:k]] = True
        core = _largest_component(regularise(chosen.reshape(distance.shape), allowed, cfg.border_mm / vs))
        if core.sum() >= 0.95 * target or k >= order.size:
            break
        k = min(order.size, int(np.ceil(k * target / max(int(core.sum()), 1))) + 1)
    shape[box] = core
    return shape


def real_shape(anatomy: Anatomy, shape: Shape, mni_from_template: np.ndarray, cfg: LesionConfig) -> np.ndarray:
    """A real binary lesion mask (any NIfTI grid in MNI space) resampled onto the subject. (X, Y, Z) bool.

    Each subject voxel knows the template world point it was sampled from; `mni_from_template` takes
    that point to MNI, the mask's inverse affine to its voxels; linear interpolation of the 0/1 mask
    thresholded at 0.5 gives the shape, so the lesion follows the subject's deformation. The shape is
    kept inside brain tissue (only there does darkening change the image) and regularised like the
    procedural ones; several disconnected parts stay (real strokes can be multifocal).
    """
    to_vox = np.linalg.inv(shape.affine) @ mni_from_template
    world = anatomy.source_world.reshape(3, -1).astype(np.float64)
    vox = (to_vox[:3, :3] @ world + to_vox[:3, 3:4]).reshape(anatomy.source_world.shape)
    sampled = ndimage.map_coordinates(shape.mask.astype(np.float32), vox, order=1, mode="constant", cval=0.0,
                                      output=np.float32)
    allowed = allowed_region(anatomy)
    return regularise((sampled >= 0.5) & allowed, allowed, cfg.border_mm / anatomy.grid.voxel_size)


@dataclass(frozen=True)
class Lesioned:
    """The anatomy with lesions, the blend weight that made them and the ground truth mask."""

    image: np.ndarray  # (X, Y, Z) float32, anatomy units (white matter ~ 1)
    weight: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    mask: np.ndarray  # (X, Y, Z) bool
    sources: tuple[str, ...]  # "procedural" or the real mask's file name, per lesion


def darken(anatomy: Anatomy, weight: np.ndarray, rng: np.random.Generator, cfg: LesionConfig) -> np.ndarray:
    """Blend toward a CSF-like target t: x * (1 - w) + min(x, t) * w. (X, Y, Z) float32."""
    level = rng.uniform(*cfg.darkening)
    noise = rng.standard_normal(anatomy.grid.shape).astype(np.float32)
    texture = ndimage.gaussian_filter(noise, 2.0 / anatomy.grid.voxel_size)
    texture /= max(float(texture.std()), 1e-6)
    target = level * (1.0 + 0.08 * texture)
    image = anatomy.image
    return (image * (1.0 - weight) + np.minimum(image, target) * weight).astype(np.float32)


def stroke_lesions(anatomy: Anatomy, rng: np.random.Generator, cfg: LesionConfig, shapes: ShapeBank | None = None,
                   mni_from_template: np.ndarray | None = None) -> Lesioned:
    """Insert 1-3 procedural lesions, or one real lesion mask picked uniformly from `shapes` (a real mask is
    a patient's whole lesion pattern, so it comes alone; uniform picks keep the bank's real size
    distribution). Empty picks (no tissue overlap) are redrawn."""
    union = np.zeros(anatomy.grid.shape, dtype=bool)
    sources: list[str] = []
    if shapes:
        if mni_from_template is None:
            raise ValueError("real lesion shapes need the template -> MNI world transform")
        for _ in range(cfg.shape_tries):
            picked = shapes.get(int(rng.integers(len(shapes))))
            shape = real_shape(anatomy, picked, mni_from_template, cfg)
            if shape.any():
                union, sources = shape, [picked.name]
                break
        else:
            raise InputError(shapes.source, f"{cfg.shape_tries} random lesion masks in a row miss the brain tissue; "
                             "are they in MNI space?")
    else:
        lo, hi = np.log(cfg.volume_ml[0]), np.log(cfg.volume_ml[1])
        depth = brain_depth(anatomy)
        for _ in range(int(rng.integers(cfg.count[0], cfg.count[1] + 1))):
            union |= procedural_shape(anatomy, float(np.exp(rng.uniform(lo, hi))), rng, cfg, depth)
            sources.append("procedural")
    weight = blend_weight(union, anatomy, cfg)
    return Lesioned(image=darken(anatomy, weight, rng, cfg), weight=weight, mask=ground_truth_mask(weight, anatomy),
                    sources=tuple(sources))
