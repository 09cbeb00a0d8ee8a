"""Volumes in, volumes out: geometry round trip and every rejected input with its message."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from phanes_cli.core.volume_io import load_mask, load_volume, save_like
from phanes_cli.errors import InputAccessError, InputError
from tests.conftest import blob_volume


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(17.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ tilt @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-20.0, 31.5, -7.25]
    return affine


GEOMETRIES = {
    "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array([[1, 0, 0, -39], [0, 1, 0, -47], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
    "anisotropic_las": np.diag([-0.7, 1.2, 3.0, 1.0]),
    "oblique": _oblique_affine(),
    "permuted": np.array([[0, 0, 1.5, 0], [-1.0, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_round_trip_keeps_input_geometry(name: str, write_nifti, tmp_path: Path) -> None:
    data = blob_volume(seed=3)
    src = write_nifti(f"{name}.nii.gz", data, GEOMETRIES[name], codes=(1, 2))
    vol = load_volume(src)
    # canonical grid is RAS+: the voxel axes point right, anterior, superior
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    out = save_like(vol.data * 2.0, vol, tmp_path / f"{name}_out.nii.gz")
    a, b = nib.load(str(src)), nib.load(str(out))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    for getter in ("get_qform", "get_sform"):
        (ma, ca), (mb, cb) = getattr(a.header, getter)(coded=True), getattr(b.header, getter)(coded=True)
        assert int(ca) == int(cb)
        np.testing.assert_allclose(ma, mb, atol=1e-6)
    np.testing.assert_allclose(a.header.get_zooms(), b.header.get_zooms(), atol=1e-6)
    # voxel order is the input's: value at each native voxel is exactly twice the input's
    np.testing.assert_allclose(np.asarray(b.dataobj), 2.0 * np.asarray(a.dataobj), rtol=1e-6)


def test_canonical_grid_maps_voxels_to_the_same_world_points(write_nifti) -> None:
    data = blob_volume(seed=1)
    src = write_nifti("lps.nii", data, GEOMETRIES["lps"])
    vol = load_volume(src)
    img = nib.load(str(src))
    ijk = np.array([5, 7, 9])
    world = img.affine @ np.r_[ijk, 1]
    ras_ijk = np.round(np.linalg.inv(vol.affine) @ world).astype(int)[:3]
    assert vol.data[tuple(ras_ijk)] == pytest.approx(float(data[tuple(ijk)]))


def test_single_volume_4d_is_accepted(write_nifti) -> None:
    data = blob_volume()[..., None]
    vol = load_volume(write_nifti("one.nii.gz", data))
    assert vol.data.shape == data.shape[:3]


def test_mask_must_share_the_grid(write_nifti) -> None:
    vol = load_volume(write_nifti("img.nii.gz", blob_volume()))
    good = write_nifti("brain.nii.gz", (blob_volume() > 0).astype(np.uint8))
    assert load_mask(good, vol).sum() == int((blob_volume() > 0).sum())
    bad = write_nifti("brain_small.nii.gz", np.ones((10, 10, 10), np.uint8))
    with pytest.raises(InputError, match="mask shape"):
        load_mask(bad, vol)


def _truncated(tmp_path: Path, write_nifti) -> Path:
    src = write_nifti("full.nii.gz", blob_volume())
    raw = src.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _truncated_uncompressed(tmp_path: Path, write_nifti) -> Path:
    src = write_nifti("full.nii", blob_volume())
    raw = src.read_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(raw[: 352 + 100])
    return path


def _corrupt_gzip(tmp_path: Path, write_nifti) -> Path:
    path = tmp_path / "corrupt.nii.gz"
    raw = bytearray(gzip.compress(b"\x00" * 4096))
    raw[20:40] = b"\xff" * 20
    path.write_bytes(bytes(raw))
    return path


def _file(name: str, content: bytes):
    def make(tmp: Path, _write) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def _folder(tmp: Path, _write) -> Path:
    path = tmp / "dir.nii.gz"
    path.mkdir()
    return path


REJECTED = {
    "missing": (lambda tmp, w: tmp / "nope.nii.gz", "file not found"),
    "empty": (_file("empty.nii.gz", b""), "file is empty"),
    "not_nifti_name": (_file("notes.txt", b"hello"), "not a NIfTI file"),
    "text_as_nifti": (_file("text.nii", b"this is not an image " * 40), "NIfTI"),
    "text_as_gz": (_file("text.nii.gz", b"plain text " * 50), "corrupt|NIfTI"),
    "truncated_gz": (_truncated, "truncated|corrupt"),
    "truncated_raw": (_truncated_uncompressed, "truncated|corrupt"),
    "corrupt_gz": (_corrupt_gzip, "corrupt|NIfTI"),
    "slice_2d": (lambda tmp, w: w("flat.nii.gz", np.ones((30, 30), np.float32)), "not 3D"),
    "slice_3d_flat": (lambda tmp, w: w("flat3.nii.gz", np.ones((30, 30, 1), np.float32)), "not 3D"),
    "multi_4d": (lambda tmp, w: w("multi.nii.gz", np.ones((10, 10, 10, 3), np.float32)), "4D image with 3 volumes"),
    "nan_voxels": (
        lambda tmp, w: w("nan.nii.gz", np.where(blob_volume() > 50, np.nan, 1).astype(np.float32)), "NaN or infinite"
    ),
    "inf_voxels": (lambda tmp, w: w("inf.nii.gz", np.full((8, 8, 8), np.inf, np.float32)), "NaN or infinite"),
    "folder": (_folder, "folder"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_inputs_are_rejected_with_a_specific_message(case: str, tmp_path: Path, write_nifti) -> None:
    make, message = REJECTED[case]
    path = make(tmp_path, write_nifti)
    with pytest.raises(InputError, match=message) as info:
        load_volume(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (np.array([np.nan, 0, 0, 0], "<f4"), "affine contains non-finite"),
        (np.zeros(4, "<f4"), "voxel size of 0 along axis x"),
        (np.array([1e30, 0, 0, 0], "<f4"), r"voxel size x=1e\+30 mm is above 50 mm"),
    ],
)
def test_broken_affine_is_rejected(row: np.ndarray, message: str, write_nifti) -> None:
    path = write_nifti("ok.nii", blob_volume())
    raw = bytearray(path.read_bytes())
    # srow_x starts at byte 280 of the NIfTI-1 header (4 x float32);
    # qform_code (int16) at 252 is zeroed so the sform is used
    raw[280:296] = row.tobytes()
    raw[252:254] = np.array([0], dtype="<i2").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=message) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_absurd_size_is_rejected_before_reading_voxels(write_nifti) -> None:
    path = write_nifti("big.nii.gz", blob_volume())
    with pytest.raises(InputError, match="above the limit"):
        load_volume(path, max_voxels=1000)


def test_a_file_without_any_affine_uses_its_voxel_size(tmp_path: Path) -> None:
    img = nib.Nifti1Image(blob_volume(), np.diag([0.8, 1.2, 2.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "analyze_style.nii"))
    vol = load_volume(tmp_path / "analyze_style.nii")
    assert vol.zooms == pytest.approx((0.8, 1.2, 2.0))


def test_errors_say_whether_a_resumed_run_should_retry() -> None:
    assert InputError("a.nii", "bad").retryable is False
    assert InputAccessError("a.nii", "permission denied").retryable is True
    assert isinstance(InputAccessError("a.nii", "x"), InputError)

