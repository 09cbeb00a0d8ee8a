"""`phanes_cli.predict`: one volume in memory, no Ray, no files written (a notebook's or a pipeline's call).

The same steps as screening, in one process: load + brain mask + QC (inputs.brain_masks.load_checked),
the model (core.pipeline.run_volume on the chosen backend), then the lesion rule of the bundle's calibration
and the statistics row (core.recipe.measure_volume, as `phanes screen` and `phanes stats`). The maps come
back as nibabel images in the input's exact geometry and header, as `phanes screen` writes them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.recipe import measure_volume
from phanes_cli.core.shipped_models import default_bundle
from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS, image_like
from phanes_cli.errors import InputError
from phanes_cli.inputs.brain_masks import CheckedVolume, load_checked
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.screening.options import check_batch_size


@dataclass(frozen=True)
class Prediction:
    """One volume's results: images in the input's geometry, its statistics row and one row per lesion."""

    lesion_mask: nib.Nifti1Image  # uint8, 1 = lesion
    anomaly: nib.Nifti1Image  # float32 anomaly score s(x), 0 outside the brain
    pseudo_healthy: nib.Nifti1Image  # float32, the input's intensities with the inpainted regions replaced
    statistics: dict[str, Any]  # the volumes.parquet columns that describe the volume, its lesions and the QC
    lesions: list[dict[str, Any]]  # the lesions.parquet rows
    qc_flags: tuple[str, ...]
    brain_mask_source: str  # file, model or threshold


def _load(image: nib.spatialimages.SpatialImage | str | Path,
          brain_mask: nib.spatialimages.SpatialImage | str | Path | None, skull_strip: str,
          device: str) -> CheckedVolume:
    """load_checked on a path, or on an in-memory image written unchanged to a temporary file first (any
    nibabel image: nibabel converts it to NIfTI); errors name the in-memory image, not the temporary file."""
    for name, item in (("image", image), ("brain_mask", brain_mask)):
        if item is not None and not isinstance(item, (str, Path, nib.spatialimages.SpatialImage)):
            raise TypeError(f"predict: {name} must be a NIfTI path or a nibabel image, not {type(item).__name__}")
    if isinstance(image, (str, Path)) and not isinstance(brain_mask, nib.spatialimages.SpatialImage):
        return load_checked(image, brain_mask, DEFAULT_MAX_VOXELS, skull_strip, device)
    with tempfile.TemporaryDirectory(prefix="phanes-predict-") as tmp:
        paths: list[Path | str | None] = []
        for name, item in (("image.nii", image), ("brain.nii", brain_mask)):
            if isinstance(item, nib.spatialimages.SpatialImage):
                nib.save(item, str(Path(tmp) / name))
                paths.append(Path(tmp) / name)
            else:
                paths.append(item)
        assert paths[0] is not None
        try:
            return load_checked(paths[0], paths[1], DEFAULT_MAX_VOXELS, skull_strip, device)
        except InputError as exc:
            if not exc.path.startswith(tmp):
                raise
            what = "in-memory image" if exc.path.endswith("image.nii") else "in-memory brain mask"
            raise type(exc)(what, exc.reason) from None


def predict(image: nib.spatialimages.SpatialImage | str | Path, bundle: str | Path | Bundle | None = None,
            brain_mask: nib.spatialimages.SpatialImage | str | Path | None = None, device: str = "auto",
            backend: str = "auto", skull_strip: str = "auto", batch_size: int = 32) -> Prediction:
    """Screen one T1 volume (a nibabel image or a NIfTI path) with `bundle` (default: the shipped model).

    Raises InputError / QualityError for a volume that cannot be screened, BundleError for a bad bundle,
    TypeError for an `image` or `brain_mask` that is neither a path nor a nibabel image (a bare array has no
    geometry), ConfigError for a batch size `phanes screen` would refuse (`options.check_batch_size`).
    """
    check_batch_size(batch_size)
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle if bundle is not None else default_bundle())
    calibration = model.require_calibration()
    dev = select_device(device)
    checked = _load(image, brain_mask, skull_strip, str(dev))
    volume = checked.volume
    runner = choose_backend(backend, model, dev)
    maps = run_volume(volume.data, checked.brain, volume.zooms, runner, model.config, calibration.mask_threshold,
                      batch_size)
    measures = measure_volume("image", volume, checked.brain, maps.anomaly, calibration, checked.qc_flags)
    assert maps.pseudo_healthy is not None
    return Prediction(lesion_mask=image_like(measures.lesion_mask.astype(np.uint8), volume, np.uint8),
                      anomaly=image_like(maps.anomaly, volume, np.float32),
                      pseudo_healthy=image_like(maps.pseudo_healthy, volume, np.float32),
                      statistics=measures.row, lesions=measures.lesions, qc_flags=checked.qc_flags,
                      brain_mask_source=checked.source)
