"""Connected lesion components: labelling and a per-lesion table (the measurements of a lesion mask).

One connectivity is used everywhere so that evaluation and screening count the same lesions: full
connectivity of the array's dimension (26-neighbourhood in 3D, 8 in 2D). Lesion segmentations at
1 mm resolution often touch only along edges or corners between slices; splitting those into several
"lesions" would inflate lesion counts and false-positive components.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components of a boolean mask with full connectivity (26 in 3D).

    Returns the int32 label array (same shape, 0 = background, components 1..n in scipy's scan
    order) and n.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels = np.empty(mask.shape, dtype=np.int32)  # given as an array: scipy then returns only the count
    n = ndimage.label(mask, structure=structure, output=labels)
    return labels, int(n)


def numbered_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """`label_components`, renumbered as `lesion_table` numbers lesions: 1 = most voxels, ties by bbox_min, then
    by scan order. Returns the int32 label array (value = lesion_index) and n."""
    labels, n = label_components(mask)
    if n == 0:
        return labels, 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    bbox_min = np.array([[s.start for s in sl] for sl in ndimage.find_objects(labels)], dtype=np.int64)
    # Sort keys from least to most significant for lexsort: scan order, bbox_min z/y/x, -count.
    order = np.lexsort((np.arange(n), bbox_min[:, 2], bbox_min[:, 1], bbox_min[:, 0], -counts))
    rank = np.zeros(n + 1, dtype=np.int32)
    rank[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return rank[labels], n


def _check_table_inputs(mask: np.ndarray, score: np.ndarray | None, affine: np.ndarray,
                        zooms: tuple[float, float, float], axial_axis: int) -> None:
    if mask.ndim != 3:
        raise ValueError(f"lesion_table needs a 3D mask, got shape {mask.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if len(zooms) != 3:
        raise ValueError(f"zooms must have 3 entries, got {zooms}")
    if axial_axis not in (0, 1, 2):
        raise ValueError(f"axial_axis must be 0, 1 or 2, got {axial_axis}")
    if score is not None and np.shape(score) != mask.shape:
        raise ValueError(f"score shape {np.shape(score)} differs from mask shape {mask.shape}")


def lesion_table(
    mask: np.ndarray,
    score: np.ndarray | None,
    affine: np.ndarray,
    zooms: tuple[float, float, float],
    axial_axis: int = 2,
) -> list[dict]:
    """Describe every connected lesion of a binary 3D mask, one dict per lesion.

    mask: (X, Y, Z) bool, already restricted to the brain. score: (X, Y, Z) anomaly map or None (then
    mean_score and max_score are None). affine: (4, 4) voxel-to-world (mm). zooms: voxel size in mm.
    Lesions are numbered 1.. by voxel count descending, then by bbox_min, then by scan order, so the
    numbering is deterministic. Coordinates: centroid_voxel in voxel units (floats), centroid_world_mm
    through the affine, bbox_min/bbox_max inclusive voxel indices, slice_min/slice_max along axial_axis.
    """
    mask = np.asarray(mask, dtype=bool)
    affine = np.asarray(affine, dtype=np.float64)
    _check_table_inputs(mask, score, affine, zooms, axial_axis)
    labels, n = numbered_components(mask)
    if n == 0:
        return []
    # Per-component sums over the lesion voxels only: far cheaper than passes over the whole volume.
    flat = np.flatnonzero(labels)
    component = labels.ravel()[flat]
    index = np.arange(1, n + 1)
    counts = np.bincount(component, minlength=n + 1)[1:]
    coords = np.unravel_index(flat, mask.shape)
    centroids = np.stack(
        [np.bincount(component, weights=c, minlength=n + 1)[1:] / counts for c in coords], axis=1
    )
    slices = ndimage.find_objects(labels)
    bbox_min = np.array([[s.start for s in sl] for sl in slices], dtype=np.int64)
    bbox_max = np.array([[s.stop - 1 for s in sl] for sl in slices], dtype=np.int64)
    world = (affine @ np.c_[centroids, np.ones(n)].T).T[:, :3]
    if score is not None:
        values = np.asarray(score).ravel()[flat].astype(np.float64)
        means = np.bincount(component, weights=values, minlength=n + 1)[1:] / counts
        maxima = np.asarray(ndimage.maximum(values, component, index), dtype=np.float64)
    voxel_ml = float(np.prod(zooms)) / 1000.0

    rows: list[dict] = []
    for i in range(n):  # label i + 1 is lesion_index i + 1 (numbered_components)
        rows.append(
            {
                "lesion_index": i + 1,
                "voxel_count": int(counts[i]),
                "volume_ml": float(counts[i]) * voxel_ml,
                "centroid_voxel": tuple(float(c) for c in centroids[i]),
                "centroid_world_mm": tuple(float(c) for c in world[i]),
                "bbox_min": tuple(int(c) for c in bbox_min[i]),
                "bbox_max": tuple(int(c) for c in bbox_max[i]),
                "mean_score": float(means[i]) if score is not None else None,
                "max_score": float(maxima[i]) if score is not None else None,
                "slice_min": int(bbox_min[i, axial_axis]),
                "slice_max": int(bbox_max[i, axial_axis]),
            }
        )
    return rows
