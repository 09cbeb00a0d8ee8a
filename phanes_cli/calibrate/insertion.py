"""Real lesion shapes inserted into healthy validation volumes, with exact ground truth (for `calibrate --tune`).

Lesion insertion works on any validation volume: intensities are normalised to white matter, the brain's
bounding box is fitted to the MNI brain's box (the lesion masks are in MNI space), and the lesion is
blended in exactly as `synth.lesions` does for synthetic subjects, plus noise at the level estimated
from the volume so the lesion is not smoother than the tissue around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phanes_cli.errors import PhanesError
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.synth.lesion_bank import ShapeBank
from phanes_cli.synth.lesions import LesionConfig, stroke_lesions
from phanes_cli.synth.templates import Grid, Template, box_to_mni, white_matter_level
from phanes_cli.synth.variation import Anatomy


@dataclass(frozen=True)
class LesionedVolume:
    """A validation volume with inserted real lesions and their exact ground truth (empty: a healthy volume)."""

    id: str
    image: np.ndarray  # (X, Y, Z) float32, the volume's own intensity units
    brain: np.ndarray  # (X, Y, Z) bool
    truth: np.ndarray  # (X, Y, Z) bool
    voxel_ml: float
    zooms: tuple[float, float, float]  # voxel size (mm) along the RAS+ axes


def noise_level(data: np.ndarray, brain: np.ndarray) -> float:
    """Robust noise std: MAD of neighbour differences / sqrt(2) inside the brain (edges are outliers)."""
    both = brain[1:] & brain[:-1]
    diff = (data[1:] - data[:-1])[both] / np.sqrt(2.0)
    if diff.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))))


def volume_anatomy(data: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> tuple[Anatomy, float]:
    """A volume as `synth` anatomy (white matter 1, tissue = brain brighter than half of it) and its WM level."""
    wm = white_matter_level(data, brain)
    if wm <= 0:
        raise PhanesError("tuning: a validation volume has no positive brain intensities")
    image = np.where(brain, data / wm, 0.0).astype(np.float32)
    axes = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in data.shape), indexing="ij")
    world = np.tensordot(affine[:3, :3].astype(np.float32), np.stack(axes), axes=1)
    world += affine[:3, 3].astype(np.float32)[:, None, None, None]
    tissue = (brain & (image > 0.5)).astype(np.float32)
    grid = Grid(shape=data.shape, affine=affine)
    return Anatomy(image=image, brain=brain, tissue=tissue, source_world=world, grid=grid), wm


def insert_lesion(data: np.ndarray, brain: np.ndarray, affine: np.ndarray, bank: ShapeBank, reference: Template,
                  rng: np.random.Generator, shapes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`shapes` real lesion masks blended into a volume one after the other: (lesioned image, union of the masks).

    Voxels outside the blends are untouched. A later shape never darkens an earlier lesion again: the tissue
    map of each step (brain brighter than half of white matter) no longer contains it.
    """
    image, truth = data, np.zeros(data.shape, dtype=bool)
    to_mni = box_to_mni(brain, affine, reference)
    sigma = noise_level(data, brain)
    for _ in range(shapes):
        anatomy, wm = volume_anatomy(image, brain, affine)
        lesioned = stroke_lesions(anatomy, rng, LesionConfig(), bank, to_mni)
        noise = sigma * rng.standard_normal(data.shape).astype(np.float32)
        image = np.where(lesioned.weight > 0, lesioned.image * wm + noise * lesioned.weight, image)
        image = np.clip(image, 0.0, None).astype(np.float32)
        truth |= lesioned.mask & brain
    return image, truth


def lesioned_validation(rows: Sequence[ManifestRow], bank: ShapeBank, reference: Template, copies: int,
                        seed: int, skull_strip: str = "auto", shapes: int = 1) -> list[LesionedVolume]:
    """`copies` lesioned versions of every validation row with `shapes` real masks each (seeded per row, copy)."""
    out: list[LesionedVolume] = []
    for i, row in enumerate(rows):
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip)
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        for copy in range(copies):
            rng = np.random.default_rng([seed, i, copy])
            image, truth = insert_lesion(volume.data, brain, volume.affine, bank, reference, rng, shapes)
            out.append(LesionedVolume(f"{row.id}+lesion{copy}", image, brain, truth, voxel_ml, volume.zooms))
    return out


def healthy_validation(rows: Sequence[ManifestRow], skull_strip: str = "auto") -> list[LesionedVolume]:
    """The validation rows as they are (no lesion, empty truth): where tuning counts healthy false positives."""
    out: list[LesionedVolume] = []
    for row in rows:
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip)
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        out.append(LesionedVolume(row.id, volume.data, brain, np.zeros(brain.shape, dtype=bool), voxel_ml,
                                  volume.zooms))
    return out
