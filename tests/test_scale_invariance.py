"""The model grid is physical: the same brain reaches the networks at the same scale and place however its file
was prepared (padded, cropped, resampled, reoriented), and `restore_volume` puts maps back where they came from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import torch

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import blur_sigmas, field_window, prepare_volume, restore_volume
from phanes_cli.core.volume_io import load_volume
from phanes_cli.inputs.brain_masks import load_with_brain
from tests.conftest import SHARED_DATA, blob_volume, needs_shared

CFG = PreprocessConfig(image_size=128, field_mm=192.0)
DS = SHARED_DATA / "ds002748" / "sub-01_T1w.nii.gz"
IXI = SHARED_DATA / "ixi" / "T1" / "IXI013-HH-1212_T1.nii.gz"
IXI_MASK = SHARED_DATA / "ixi" / "brain_mask" / "IXI013-HH-1212_brain.nii.gz"


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _shift(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out


def _brain_width_px(brain_slices: torch.Tensor) -> np.ndarray:
    """In-plane extent (model pixels) of the union of the brain's model-grid slices, along both axes."""
    union = brain_slices[:, 0].amax(0).numpy() > 0
    return np.array([np.ptp(np.flatnonzero(union.any(1))) + 1, np.ptp(np.flatnonzero(union.any(0))) + 1])


@needs_shared()
def test_padding_and_cropping_the_file_give_identical_model_slices(tmp_path: Path) -> None:
    """Zeros added around a real brain, or the file cut to its brain, leave the slices bit-identical: the window
    follows the brain, not the file's field of view (the old grid scaled the brain by the field of view)."""
    img = nib.load(str(DS))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = (data > 0).astype(np.uint8)  # the brain mask travels with the file: only the grid is under test
    pad = 40
    where = np.argwhere(mask)
    low, high = where.min(0), where.max(0) + 1
    cut = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))  # the file cut to its brain
    variants = [(img.affine, data, mask), (_shift(img.affine, np.full(3, -pad)), np.pad(data, pad), np.pad(mask, pad)),
                (_shift(img.affine, low), data[cut], mask[cut])]
    results = []
    for k, (affine, image, brain_mask) in enumerate(variants):
        path = _save(tmp_path / f"v{k}.nii.gz", image, affine)
        volume, brain, _ = load_with_brain(path, _save(tmp_path / f"m{k}.nii.gz", brain_mask, affine))
        results.append(prepare_volume(volume.data, brain, CFG, volume.zooms))
    ref = results[0]
    for other in results[1:]:
        assert other.slices.shape == ref.slices.shape
        torch.testing.assert_close(other.slices, ref.slices, rtol=0, atol=0)
        torch.testing.assert_close(other.brain, ref.brain, rtol=0, atol=0)


@needs_shared()
def test_a_brain_at_2_mm_and_at_1_mm_spans_the_same_model_pixels() -> None:
    """A real 2 mm brain and the same brain resampled to 1 mm: its in-plane extent in model pixels is its extent
    in mm / 1.5 mm both times (the old grid gave each file its own pixel size)."""
    volume, brain, _ = load_with_brain(IXI, IXI_MASK)
    fine_data = np.repeat(np.repeat(volume.data, 2, 0), 2, 1)
    fine_brain = np.repeat(np.repeat(brain, 2, 0), 2, 1)
    coarse = prepare_volume(volume.data, brain, CFG, volume.zooms)
    fine = prepare_volume(fine_data, fine_brain, CFG, (volume.zooms[0] / 2, volume.zooms[1] / 2, volume.zooms[2]))
    pixel_mm = CFG.field_mm / CFG.image_size
    where = np.argwhere(brain.any(2))
    extent_mm = (where.max(0) - where.min(0) + 1) * np.array(volume.zooms[:2])
    for prepared in (coarse, fine):
        assert np.all(np.abs(_brain_width_px(prepared.brain) - extent_mm / pixel_mm) <= 2.0)
    assert float((coarse.slices - fine.slices).abs().mean()) < 0.02  # same anatomy, same place


@needs_shared()
def test_a_reoriented_file_gives_the_same_slices(tmp_path: Path) -> None:
    img = nib.load(str(DS))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                                nib.orientations.axcodes2ornt(("P", "I", "L")))
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj, np.float32), transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, img.shape)
    other = _save(tmp_path / "pil.nii.gz", data, affine)
    prepared = []
    for path in (DS, other):
        volume = load_volume(path)
        prepared.append(prepare_volume(volume.data, volume.data > 0, CFG, volume.zooms))
    torch.testing.assert_close(prepared[0].slices, prepared[1].slices, rtol=0, atol=0)


def test_the_window_is_the_field_of_view_in_native_voxels() -> None:
    assert field_window((1.0, 1.0, 1.0), 192.0) == (192, 192)
    assert field_window((0.8, 2.0, 1.0), 192.0) == (240, 96)


def test_restore_puts_maps_back_and_fills_what_the_window_left_out() -> None:
    """A volume wider than the field (a 300 mm grid at 1 mm with a small brain): the window is centred on the
    brain, maps come back in place, and voxels outside the window hold the fill value."""
    shape = (300, 260, 12)
    data = np.zeros(shape, np.float32)
    data[100:160, 150:230, :] = blob_volume((60, 80, 12))
    brain = data > 0
    prepared = prepare_volume(data, brain, replace(CFG, resolution_mm=0.0), (1.0, 1.0, 1.0))  # geometry only
    assert prepared.geometry.window == (192, 192)
    centre = [(100 + 159) / 2, (150 + 229) / 2]
    for axis in range(2):  # the window's centre is the brain's, to half a voxel
        assert abs(prepared.geometry.origin[axis] + (192 - 1) / 2 - centre[axis]) <= 0.5
    ones = restore_volume(torch.ones_like(prepared.slices), prepared.geometry, fill=-1.0)
    idx = prepared.geometry.covered
    o = prepared.geometry.origin
    inside = np.zeros(shape, bool)
    inside[max(o[0], 0):o[0] + 192, max(o[1], 0):o[1] + 192, :] = True
    assert np.all(ones[:, :, idx][inside[:, :, idx]] > 0.99)
    assert np.all(ones[:, :, idx][~inside[:, :, idx]] == 0.0)
    back = restore_volume(prepared.slices, prepared.geometry)
    scaled = np.clip(data / prepared.scale, 0, 1)
    err = np.abs(back[:, :, idx] - scaled[:, :, idx])[brain[:, :, idx]]
    assert float(np.median(err)) < 0.02


def test_field_of_view_out_of_range_is_refused() -> None:
    from phanes_cli.config import config_from_dict
    from phanes_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="field_mm"):
        config_from_dict({"preprocess": {"field_mm": 10.0}})


@needs_shared()
def test_another_dtype_of_the_same_voxels_gives_the_same_slices(tmp_path: Path) -> None:
    """The uint8 file and the same voxels stored as float32 or int16: identical model slices."""
    img = nib.load(str(DS))
    data = np.asarray(img.dataobj)
    prepared = []
    for dtype in (np.float32, np.int16):
        path = _save(tmp_path / f"{np.dtype(dtype).name}.nii.gz", data.astype(dtype), img.affine)
        volume = load_volume(path)
        prepared.append(prepare_volume(volume.data, volume.data > 0, CFG, volume.zooms))
    volume = load_volume(DS)
    reference = prepare_volume(volume.data, volume.data > 0, CFG, volume.zooms)
    for other in prepared:
        torch.testing.assert_close(other.slices, reference.slices, rtol=0, atol=0)


def _plane_mm(volume_affine: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Superior coordinate (mm) of each model plane of a RAS+ volume."""
    return positions * float(volume_affine[2, 2]) + float(volume_affine[2, 3])


@needs_shared()
def test_a_resampled_brain_is_cut_at_the_same_physical_planes(tmp_path: Path) -> None:
    """The same real brain at 1 mm and resampled to 0.8 and 2 mm: model planes 1.5 mm apart at the same heights
    (within a tenth of a millimetre; the old grid took every native slice, 0.8, 1 or 2 mm apart), so the maps of
    every variant sample the same anatomy."""
    img = nib.load(str(DS))
    img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    heights = []
    for size in (1.0, 0.8, 2.0):
        variant = img if size == 1.0 else nib.processing.resample_to_output(img, voxel_sizes=(size,) * 3, order=1)
        volume = load_volume(_save(tmp_path / f"{size}.nii.gz", np.asarray(variant.dataobj), variant.affine))
        prepared = prepare_volume(volume.data, volume.data > 1, CFG, volume.zooms)
        planes = _plane_mm(volume.affine, prepared.geometry.positions)
        np.testing.assert_allclose(np.diff(planes), CFG.field_mm / CFG.image_size, atol=1e-6)
        heights.append(planes)
    for other in heights[1:]:
        shared = min(len(other), len(heights[0]))
        offset = np.abs(other[:, None] - heights[0][None, :]).min(axis=1)  # nearest plane of the 1 mm file
        assert shared >= 0.95 * len(heights[0])
        assert float(np.median(offset)) < 0.1


def test_blur_brings_finer_files_to_the_model_resolution_and_leaves_coarser_ones() -> None:
    """FWHMs add in quadrature: a 1 mm axis gets sqrt(2^2 - 1^2) mm of Gaussian FWHM to read as 2 mm; a 2 mm or
    coarser axis none."""
    fwhm_per_sigma = 2.0 * np.sqrt(2.0 * np.log(2.0))
    sx, sy, sz = blur_sigmas((1.0, 0.5, 2.5), 2.0)
    assert sx == pytest.approx(np.sqrt(3.0) / fwhm_per_sigma)
    assert sy == pytest.approx(np.sqrt(4.0 - 0.25) / fwhm_per_sigma / 0.5)
    assert sz == 0.0
    data = blob_volume((40, 48, 36))
    two_mm = (2.0, 2.0, 2.0)
    sharp = prepare_volume(data, data > 0, replace(CFG, resolution_mm=0.0), two_mm)
    blurred = prepare_volume(data, data > 0, CFG, two_mm)
    torch.testing.assert_close(blurred.slices, sharp.slices, rtol=0, atol=0)  # a 2 mm file is already at 2 mm
    noisy = np.zeros((120, 120, 40), np.float32)  # fine detail at 1 mm: noise inside a box of brain
    noisy[10:110, 10:110, 5:35] = 100 + 20 * np.random.default_rng(0).standard_normal((100, 100, 30))
    fine, fine_sharp = (prepare_volume(noisy, noisy > 0, replace(CFG, resolution_mm=r), (1.0, 1.0, 1.0))
                        for r in (2.0, 0.0))
    inside = torch.zeros_like(fine.brain, dtype=torch.bool)
    inside[..., 20:60, 20:60] = True  # well inside the box's 67 model pixels

    def roughness(x: torch.Tensor) -> float:  # neighbour differences: the fine detail blur removes
        return float((x[..., 1:, :] - x[..., :-1, :]).abs()[inside[..., 1:, :]].mean())

    assert roughness(fine.slices) < 0.7 * roughness(fine_sharp.slices)


def test_resolution_out_of_range_is_refused() -> None:
    from phanes_cli.config import config_from_dict
    from phanes_cli.errors import ConfigError

    for bad in (-1.0, 9.0, float("nan")):
        with pytest.raises(ConfigError, match="resolution_mm"):
            config_from_dict({"preprocess": {"resolution_mm": bad}})
    assert config_from_dict({"preprocess": {"resolution_mm": 0.0}}).preprocess.resolution_mm == 0.0
