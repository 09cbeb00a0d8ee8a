"""Small lesions inserted at known places in real brains, for `core.locations` (its test and
benchmarks/lesion_locations.py).

The truth comes from the IXI brains' DLMUSE parcellations (../shared/data/ixi, 2 mm): each lesion is a ball of
LESION_RADIUS_MM around a voxel drawn from a labelled region, darkened to a T1-hypointense level (a factor drawn
in DARKEN of its own intensity) except in the ventricles, where a "lesion" is a false positive on CSF and keeps it:
- periventricular: white matter (MUSE 81-95) within 2.9 mm of a lateral or 3rd ventricle;
- juxtacortical: cortex (MUSE 100-207);
- deep_white_matter: white matter at least 10 mm from the ventricles and 8 mm from the cortex;
- infratentorial: cerebellum (38-41, 71-73) or brainstem (35);
- in_ventricle: inside a lateral ventricle (49-52, at least 2 mm from its wall): expected `periventricular` with
  csf_contact `ventricle`.
Lesions of one brain are placed at least MIN_APART_MM apart and classified together, as one screened volume's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from phanes_cli.core.locations import lesion_locations
from phanes_cli.core.volume_io import load_mask, load_volume

IXI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi"
VENTRICLES = (4, 49, 50, 51, 52)
LATERAL_VENTRICLES = (49, 50, 51, 52)
WHITE_MATTER = tuple(range(81, 96))
INFRATENTORIAL = (35, 38, 39, 40, 41, 71, 72, 73)
PLACES = ("periventricular", "juxtacortical", "deep_white_matter", "infratentorial", "in_ventricle")
LESION_RADIUS_MM = 3.0
MIN_APART_MM = 14.0
DARKEN = (0.5, 0.8)


@dataclass(frozen=True)
class Placed:
    """One inserted lesion: where it was put (a PLACES name) and what `lesion_locations` said."""

    brain: str
    place: str
    location: str
    csf_contact: str
    csf_fraction: float


def ixi_ids() -> list[str]:
    """The IXI brains with a T1, a brain mask and a DLMUSE parcellation, sorted."""
    return sorted(p.name.removesuffix("_T1.nii.gz") for p in (IXI / "T1").glob("*_T1.nii.gz")
                  if (IXI / "DLMUSE" / f"{p.name.removesuffix('_T1.nii.gz')}_DLMUSE.nii.gz").is_file())


def candidate_regions(muse: np.ndarray, zooms: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Where each kind of lesion may be centred, from a DLMUSE label array (bool per PLACES name)."""
    ventricles = np.isin(muse, VENTRICLES)
    to_ventricle = ndimage.distance_transform_edt(~ventricles, sampling=zooms)
    cortex = muse >= 100
    to_cortex = ndimage.distance_transform_edt(~cortex, sampling=zooms)
    white = np.isin(muse, WHITE_MATTER)
    lateral = np.isin(muse, LATERAL_VENTRICLES)
    return {"periventricular": white & (to_ventricle <= 2.9),
            "juxtacortical": cortex,
            "deep_white_matter": white & (to_ventricle >= 10.0) & (to_cortex >= 8.0),
            "infratentorial": np.isin(muse, INFRATENTORIAL),
            "in_ventricle": lateral & (ndimage.distance_transform_edt(lateral, sampling=zooms) >= 2.0)}


def _ball(zooms: tuple[float, float, float]) -> np.ndarray:
    reach = [int(LESION_RADIUS_MM // z) for z in zooms]
    grid = np.meshgrid(*[np.arange(-r, r + 1) * z for r, z in zip(reach, zooms, strict=True)], indexing="ij")
    return sum(g**2 for g in grid) <= LESION_RADIUS_MM**2


def insert_lesions(image: np.ndarray, muse: np.ndarray, zooms: tuple[float, float, float], per_place: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(image with the lesions, lesion labels 1..n, the place of each label) for one brain."""
    regions = candidate_regions(muse, zooms)
    ball = _ball(zooms)
    half = np.array(ball.shape) // 2
    labels = np.zeros(image.shape, dtype=np.int32)
    lesioned = image.copy()
    centres: list[np.ndarray] = []
    places: list[str] = []
    for place in PLACES:
        voxels = np.argwhere(regions[place])
        for index in rng.permutation(len(voxels))[: 50 * per_place]:
            centre = voxels[index]
            lo, hi = centre - half, centre + half + 1
            if np.any(lo < 0) or np.any(hi > np.array(image.shape)):
                continue
            if any(np.linalg.norm((centre - c) * zooms) < MIN_APART_MM for c in centres):
                continue
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            inside = ball & (muse[box] > 0)
            labels[box][inside] = len(places) + 1
            if place != "in_ventricle":
                lesioned[box][inside] *= rng.uniform(*DARKEN)
            centres.append(centre)
            places.append(place)
            if places.count(place) == per_place:
                break
    return lesioned, labels, places


def classify_brain(vid: str, per_place: int, seed: int) -> list[Placed]:
    """Insert `per_place` lesions of every place into one IXI brain and classify them."""
    volume = load_volume(IXI / "T1" / f"{vid}_T1.nii.gz")
    brain = load_mask(IXI / "brain_mask" / f"{vid}_brain.nii.gz", volume)
    muse = np.rint(load_volume(IXI / "DLMUSE" / f"{vid}_DLMUSE.nii.gz").data).astype(np.int32)
    rng = np.random.default_rng([seed, int(vid[3:6])])
    image, labels, places = insert_lesions(volume.data, muse, volume.zooms, per_place, rng)
    found = lesion_locations(image, brain | (labels > 0), labels, volume.zooms)
    return [Placed(vid, place, f.location, f.csf_contact, f.csf_fraction)
            for place, f in zip(places, found, strict=True)]


def expected(place: str) -> str:
    """The location class a lesion put at `place` should get."""
    return "periventricular" if place == "in_ventricle" else place
