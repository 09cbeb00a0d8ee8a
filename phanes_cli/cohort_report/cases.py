"""One volume's images for the report, on one RAS+ grid: input, anomaly map, lesion mask, brain, ground truth.

The figures and the viewer draw the same things, so both read them here, cropped to the brain (BRAIN_MARGIN_MM
around it). The brain is the mask the volume was screened in, which every run writes (`layout.brain_mask_files`)
with its source in the volume row (a given file, deepbet's extraction or the threshold rule). For a run from before
that: the manifest's brain mask when the volumes table names one, else `core.preprocess.auto_brain_mask`, the
threshold rule (an estimate for a volume screened in another mask). Not the anomaly map's support: s(x) is
written inside the inpainting mask only, a small part of the brain.
The views open on the largest lesion: its centroid from lesions.parquet (world mm), or the lesion
mask's largest component when the table has none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import Volume, load_volume
from phanes_cli.errors import InputError
from phanes_cli.run_folder.commit import input_sha256
from phanes_cli.run_folder.layout import OutputLayout


@dataclass(frozen=True)
class CaseArrays:
    """One volume's arrays on its RAS+ grid, (X, Y, Z) each, and where the views open."""

    image: np.ndarray
    anomaly: np.ndarray
    lesion: np.ndarray  # bool
    brain: np.ndarray  # bool
    truth: np.ndarray | None  # bool, the ground-truth lesion mask when the manifest has one
    pseudo_healthy: np.ndarray | None
    affine: np.ndarray  # RAS+ voxel -> world mm
    zooms: tuple[float, float, float]
    centre: tuple[int, int, int]  # RAS+ voxel the views open on
    brain_source: str  # what the brain outline is: the mask screening used (and its source), or a stand-in
    notes: tuple[str, ...] = ()  # what could not be shown, and why (a ground truth off the grid)


BRAIN_MARGIN_MM = 6.0
USED_MASK = {"file": "mask used: the given brain mask file", "model": "mask used: deepbet brain extraction",
             "threshold": "mask used: threshold rule"}


def _same_grid(volume: Volume, reference: Volume, what: str) -> np.ndarray:
    if volume.data.shape != reference.data.shape or not np.allclose(volume.affine, reference.affine, atol=1e-3):
        raise InputError(volume.path, f"{what} is not on the input image's grid {reference.data.shape}")
    return volume.data


def _optional_mask(row: dict[str, Any], column: str, reference: Volume, what: str) -> np.ndarray | None:
    value = row.get(column)
    if not isinstance(value, str) or not value or not Path(value).is_file():
        return None
    return _same_grid(load_volume(value), reference, what) > 0


def _centre(lesion: np.ndarray, brain: np.ndarray, affine: np.ndarray, centroid_mm: Any) -> tuple[int, int, int]:
    shape = np.array(lesion.shape)
    if centroid_mm is not None and len(centroid_mm) == 3 and all(np.isfinite(centroid_mm)):
        voxel = np.linalg.solve(affine, np.array([*centroid_mm, 1.0]))[:3]
    elif lesion.any():
        labels, n = ndimage.label(lesion)
        largest = 1 + int(np.argmax(ndimage.sum_labels(lesion, labels, range(1, n + 1))))
        voxel = np.array(ndimage.center_of_mass(labels == largest))
    elif brain.any():
        voxel = np.array(ndimage.center_of_mass(brain))
    else:
        voxel = (shape - 1) / 2
    clipped = np.clip(np.round(voxel), 0, shape - 1).astype(int)
    return int(clipped[0]), int(clipped[1]), int(clipped[2])


def _check_unchanged(row: dict[str, Any]) -> None:
    """An InputError when the input file no longer hashes to the run's `input_sha256` (tables of schema >= 4);
    a file that cannot be read is left to `load_volume`, which says why."""
    recorded = row.get("input_sha256")
    try:
        changed = recorded is not None and input_sha256(row["input_path"]) != recorded
    except OSError:
        return
    if changed:
        raise InputError(row["input_path"], "changed since it was screened (its sha256 differs from the run's "
                                            "input_sha256): the maps were computed from another file")


def load_case(layout: OutputLayout, row: dict[str, Any], centroid_mm: Any = None) -> CaseArrays:
    """Read and check one volume's files; an InputError names the file that is missing or off-grid."""
    vid = row["id"]
    _check_unchanged(row)
    image = load_volume(row["input_path"])
    anomaly = _same_grid(load_volume(layout.map_path(vid, "anomaly")), image, "the anomaly map")
    lesion = _same_grid(load_volume(layout.map_path(vid, "lesion_mask")), image, "the lesion mask") > 0
    pseudo_path = layout.map_path(vid, "pseudohealthy")
    pseudo = _same_grid(load_volume(pseudo_path), image, "the pseudo-healthy image") if pseudo_path.is_file() else None
    brain, source = _brain(layout, row, image)
    notes: tuple[str, ...] = ()
    try:  # the manifest's ground truth is an extra: a bad one is noted, the case is still shown
        truth = _optional_mask(row, "lesion_mask", image, "the ground-truth lesion mask")
    except InputError as exc:
        truth, notes = None, (f"ground truth not shown: {exc}",)
    whole = CaseArrays(image=image.data, anomaly=anomaly, lesion=lesion, brain=brain, truth=truth,
                       pseudo_healthy=pseudo, affine=image.affine, zooms=image.zooms,
                       centre=_centre(lesion, brain, image.affine, centroid_mm), brain_source=source, notes=notes)
    return crop_to_brain(whole)


def _brain(layout: OutputLayout, row: dict[str, Any], image: Volume) -> tuple[np.ndarray, str]:
    """The brain mask the volume was screened in and what it is; for a run that wrote none, the best stand-in."""
    used = layout.map_path(row["id"], "brain_mask")
    if used.is_file():
        brain = _same_grid(load_volume(used), image, "the brain mask used") > 0
        return brain, USED_MASK.get(str(row.get("brain_mask_source")), "mask used")
    given = _optional_mask(row, "brain_mask", image, "the brain mask")
    if given is not None:
        return given, "brain mask file"
    source = row.get("brain_mask_source")
    return auto_brain_mask(image.data), "threshold rule" if source in (None, "threshold") else "threshold estimate"


def crop_to_brain(arrays: CaseArrays) -> CaseArrays:
    """The case on the brain's bounding box plus BRAIN_MARGIN_MM (the whole grid when the brain is empty)."""
    if not arrays.brain.any():
        return arrays
    found = np.argwhere(arrays.brain)
    margin = np.ceil(BRAIN_MARGIN_MM / np.asarray(arrays.zooms)).astype(int)
    low = np.maximum(found.min(axis=0) - margin, 0)
    high = np.minimum(found.max(axis=0) + margin + 1, arrays.brain.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    shift = np.eye(4)
    shift[:3, 3] = low
    centre = np.clip(np.array(arrays.centre) - low, 0, high - low - 1)
    return replace(arrays, image=arrays.image[box], anomaly=arrays.anomaly[box], lesion=arrays.lesion[box],
                   brain=arrays.brain[box], truth=None if arrays.truth is None else arrays.truth[box],
                   pseudo_healthy=None if arrays.pseudo_healthy is None else arrays.pseudo_healthy[box],
                   affine=arrays.affine @ shift, centre=(int(centre[0]), int(centre[1]), int(centre[2])))


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary voxels (inside, touching outside): a 1-voxel shell, drawn as an outline."""
    return mask & ~ndimage.binary_erosion(mask)
