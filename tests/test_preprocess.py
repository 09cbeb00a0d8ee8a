"""Preprocessing: intensity scaling, slice selection, and the inverse that maps model grids back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import (
    auto_brain_mask,
    intensity_scale,
    prepare_volume,
    restore_volume,
    select_slices,
    slices_of,
)
from phanes_cli.core.volume_io import load_volume
from phanes_cli.errors import InputError
from phanes_cli.inputs.brain_masks import load_with_brain
from tests.conftest import SHARED_DATA, blob_volume, needs_shared

CFG = PreprocessConfig()
ONE_MM = (1.0, 1.0, 1.0)


def test_scaling_uses_the_brain_percentile_and_clips() -> None:
    data = blob_volume((40, 48, 36))
    brain = data > 0
    prepared = prepare_volume(data, brain, CFG, ONE_MM)
    assert prepared.scale == pytest.approx(float(np.percentile(data[brain], 98)), rel=1e-6)
    assert prepared.slices.min() >= 0 and prepared.slices.max() <= 1
    assert prepared.slices.shape[1:] == (1, 128, 128)
    assert prepared.brain.shape == prepared.slices.shape


def test_inverse_restores_smooth_maps_on_the_native_grid() -> None:
    shape = (70, 90, 30)  # non-square slices: padding along axis 0
    brain = np.ones(shape, bool)
    x, y = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    smooth = (0.5 + 0.4 * np.sin(2 * x) * np.cos(3 * y)).astype(np.float32)
    data = np.repeat(smooth[:, :, None], shape[2], axis=2) * 100
    prepared = prepare_volume(data, brain, replace(CFG, percentile=100.0, resolution_mm=0.0), ONE_MM)
    restored = restore_volume(prepared.slices, prepared.geometry)
    expected = data / data.max()
    idx = prepared.geometry.covered[2:-2]  # the end planes sample half zeros beyond the grid, like a padded file
    # interpolation tolerance for a down- then up-sampled smooth field (borders excluded)
    err = np.abs(restored[2:-2, 2:-2, idx] - expected[2:-2, 2:-2, idx])
    assert err.max() < 0.02
    assert restored.shape == shape


def test_inverse_of_a_binary_map_keeps_its_location() -> None:
    shape = (60, 80, 20)
    data = blob_volume(shape)
    brain = data > 0
    lesion = np.zeros(shape, bool)
    lesion[20:35, 30:50, 5:15] = True
    prepared = prepare_volume(data, brain, replace(CFG, min_brain_fraction=0.0), ONE_MM)
    grid = slices_of(lesion.astype(np.float32), prepared.geometry)
    back = restore_volume(grid, prepared.geometry) >= 0.5
    idx = prepared.geometry.covered
    inter = (back[:, :, idx] & lesion[:, :, idx]).sum()
    dice = 2 * inter / (back[:, :, idx].sum() + lesion[:, :, idx].sum())
    assert dice > 0.95


def test_slice_selection_brain_and_mid_modes() -> None:
    brain = np.zeros((10, 10, 20), bool)
    brain[2:8, 2:8, 4:16] = True
    brain[4:5, 4:5, 16] = True  # a tiny section: below 5% of the largest
    chosen = select_slices(brain, CFG)
    assert chosen.tolist() == list(range(4, 16))
    mid = select_slices(brain, replace(CFG, slice_mode="mid"))
    assert mid.tolist() == [(4 + 16) // 2]
    assert select_slices(np.zeros((5, 5, 5), bool), CFG).size == 0


def test_unprocessed_slices_hold_the_fill_value() -> None:
    data = blob_volume((40, 48, 36))
    prepared = prepare_volume(data, data > 0, replace(CFG, slice_mode="mid"), ONE_MM)
    restored = restore_volume(torch.ones_like(prepared.slices), prepared.geometry, fill=-1.0)
    (mid,) = prepared.geometry.covered
    assert np.all(restored[:, :, mid] > 0.99)
    others = np.delete(np.arange(36), mid)
    assert np.all(restored[:, :, others] == -1.0)


def test_auto_brain_mask_matches_the_foreground_of_a_skull_stripped_volume() -> None:
    data = blob_volume((60, 70, 50))
    data[25:30, 30:35, 20:25] *= 0.3  # a dark lesion inside must stay inside the mask
    mask = auto_brain_mask(data)
    truth = data > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.97
    assert mask[27, 32, 22]


def test_load_with_brain_reads_the_given_mask_or_estimates_one(tmp_path: Path) -> None:
    """A given mask file is read onto the volume's RAS+ grid; without one the automatic estimate is used."""
    data = blob_volume((30, 34, 26))
    flip = np.diag([-2.0, 2.0, 2.0, 1.0])  # an LAS file: the loaded arrays are flipped along axis 0
    image = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, flip), str(image))
    given = np.zeros(data.shape, dtype=np.uint8)
    given[3:12, 5:20, 4:9] = 1
    mask_file = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(given, flip), str(mask_file))
    volume, brain, source = load_with_brain(image, mask_file)
    np.testing.assert_array_equal(volume.data, data[::-1])
    np.testing.assert_array_equal(brain, given[::-1] > 0)
    assert source == "file"
    volume, brain, source = load_with_brain(image, None)
    np.testing.assert_array_equal(brain, auto_brain_mask(data[::-1]))
    assert source == "threshold"
    with pytest.raises(InputError, match="mask shape"):
        load_with_brain(image, _saved(tmp_path / "small.nii.gz", np.ones((5, 5, 5), dtype=np.uint8)))


def _saved(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@needs_shared()
def test_real_brain_preprocessing() -> None:
    vol = load_volume(SHARED_DATA / "healthy-t1" / "antspy_mni152_T1.nii.gz")
    brain = auto_brain_mask(vol.data)
    assert 1000 < brain.sum() * vol.voxel_ml < 2000  # an adult brain: 1.0 to 2.0 litres
    prepared = prepare_volume(vol.data, brain, CFG, vol.zooms)
    selected_mm = select_slices(brain, CFG).size * vol.zooms[2]  # 1 mm slices -> model planes 1.5 mm apart
    assert abs(prepared.slices.shape[0] - selected_mm / CFG.pixel_mm) <= 2
    assert intensity_scale(vol.data, brain, 98) > 0
    brain_pixels = prepared.slices[prepared.brain > 0]
    assert 0.3 < float(brain_pixels.mean()) < 0.9
