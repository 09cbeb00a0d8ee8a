"""The measurements of one volume's lesion mask: burden, counts by size, one row per connected lesion.

Screening's write task and `phanes stats` both measure through here, so their tables agree. Components are
`core.components.label_components` (full connectivity); volumes in mL are voxel counts times the voxel volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from phanes_cli.core.components import lesion_table, numbered_components
from phanes_cli.core.locations import LOCATION_CLASSES, lesion_locations
from phanes_cli.core.volume_io import Volume

# Lesion size bins in mL: [low, high) each; the counts per volume go to SIZE_BIN_COLUMNS.
SIZE_BINS_ML = ((0.0, 0.1), (0.1, 1.0), (1.0, 10.0), (10.0, float("inf")))

SIZE_BIN_COLUMNS = ("lesions_lt_0_1ml", "lesions_0_1_to_1ml", "lesions_1_to_10ml", "lesions_ge_10ml")


# Lesion burden per location class (`core.locations`), one volumes.parquet column each.
LOCATION_BURDEN_COLUMNS = {place: f"burden_{place}_ml" for place in LOCATION_CLASSES}


def native_zooms(volume: Volume) -> tuple[float, float, float]:
    """Voxel size along the input file's axes (from its affine, the same numbers as volume.voxel_ml)."""
    return tuple(float(z) for z in np.sqrt((volume.native_affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def brain_statistics(volume: Volume, brain: np.ndarray, anomaly: np.ndarray) -> dict[str, float]:
    """The threshold-free numbers of a volume: brain volume (mL), max and mean of s(x) over the brain."""
    in_brain = anomaly[brain]
    return {"brain_volume_ml": float(np.count_nonzero(brain)) * volume.voxel_ml,
            "max_anomaly": float(in_brain.max()) if in_brain.size else 0.0,
            "mean_anomaly": float(in_brain.mean()) if in_brain.size else 0.0}


def geometry_columns(volume: Volume) -> dict[str, Any]:
    """Shape and voxel size in the input file's axis order, as lists and as flat x/y/z columns."""
    shape, zooms = list(volume.native_shape), list(native_zooms(volume))
    return {"shape": shape, "voxel_size_mm": zooms, **{f"shape_{a}": int(n) for a, n in zip("xyz", shape, strict=True)},
            **{f"voxel_mm_{a}": z for a, z in zip("xyz", zooms, strict=True)}}


def locate(volume: Volume, brain: np.ndarray, lesion: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each lesion row's place (location, csf_contact, csf_fraction: `core.locations`, in the T1 `volume` and its
    brain mask), and the volume's burden per location class; `rows` are `lesion_table` rows of `lesion`."""
    native, n = numbered_components(volume.to_native(lesion))  # the lesion_index numbering, on the file's grid
    places = lesion_locations(volume.data, brain, volume.from_native(native), volume.zooms) if n else []
    burden = dict.fromkeys(LOCATION_BURDEN_COLUMNS.values(), 0.0)
    for row, place in zip(rows, places, strict=True):
        row.update(location=place.location, csf_contact=place.csf_contact, csf_fraction=place.csf_fraction)
        burden[LOCATION_BURDEN_COLUMNS[place.location]] += row["volume_ml"]
    return burden


def volume_statistics(vid: str, volume: Volume, brain_stats: dict[str, float], anomaly: np.ndarray,
                      lesion: np.ndarray, brain: np.ndarray | None = None
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-volume statistics and one row per connected lesion, from arrays on the RAS+ grid.

    `brain_stats` is `brain_statistics` of the volume (`phanes stats` takes it from the screening row, as
    it has no brain mask). Components are labelled on the input file's own voxel grid (a flip/permutation
    of RAS+, so the components are the same), which puts centroids, boxes and slice ranges in the file's
    voxel order; world coordinates go through the input affine. `axial_axis` is the file axis that runs
    inferior-superior. Volumes in mL are voxel counts times the voxel volume. With `brain` (the mask it was
    screened in), `volume` being the T1, every lesion gets its place and the volume its burden per location
    class (`locate`); without, those columns are null.
    """
    axial = int(volume.to_native_ornt[2, 0])
    lesions = lesion_table(volume.to_native(lesion), volume.to_native(anomaly), volume.native_affine,
                           native_zooms(volume), axial_axis=axial)
    places = locate(volume, brain, lesion, lesions) if brain is not None else dict.fromkeys(
        LOCATION_BURDEN_COLUMNS.values())
    sizes = np.array([r["volume_ml"] for r in lesions], dtype=np.float64)
    burden, brain_ml = float(np.count_nonzero(lesion)) * volume.voxel_ml, brain_stats["brain_volume_ml"]
    stats = {
        **geometry_columns(volume), **brain_stats, "lesion_burden_ml": burden,
        "lesion_burden_fraction": burden / brain_ml if brain_ml > 0 else None, "lesion_count": len(lesions),
        **{name: int(np.count_nonzero((sizes >= low) & (sizes < high)))
           for name, (low, high) in zip(SIZE_BIN_COLUMNS, SIZE_BINS_ML, strict=True)},
        "largest_lesion_ml": float(sizes.max()) if sizes.size else 0.0, **places,
    }
    rows = [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}, "id": vid, "axial_axis": axial,
             **{f"centroid_{a}_mm": c for a, c in zip("xyz", r["centroid_world_mm"], strict=True)}} for r in lesions]
    return stats, rows
