"""`phanes_cli.predict`: the in-memory API gives what `phanes screen` writes for the same volume (same maps,
same geometry, same statistics row), from a nibabel image or a path, without Ray or files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import phanes_cli
from phanes_cli.errors import InputError, QualityError
from phanes_cli.screening.engine import EXIT_OK, screen
from tests._ray import HEAD_IP, RayCluster
from tests.test_screening import affines, write_head


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle  # the session's (conftest): read only here


def test_predict_equals_screening(cluster: RayCluster, bundle: Path, tmp_path: Path, one_thread: None) -> None:
    image_path = write_head(tmp_path / "in" / "obl.nii.gz", affines()["oblique"], seed=5, qform_code=0, sform_code=2)
    out = tmp_path / "out"
    # one thread on both sides (one_thread, one-thread actors): torch's float sums follow the thread count (1 against
    # 2 threads changed 7% of the anomaly voxels in the last bit), and this comparison is bitwise
    options = phanes_cli.ScreenOptions(bundle=bundle, out=out, node_ip=HEAD_IP, quiet=True, backend="torch",
                                       outputs=frozenset({"anomaly", "lesion_mask", "pseudohealthy"}),
                                       threads_per_actor=1)
    assert screen([str(image_path)], options).exit_code == EXIT_OK
    source = nib.load(image_path)
    result = phanes_cli.predict(source, bundle=bundle, device="cpu", backend="torch")
    assert isinstance(result, phanes_cli.Prediction)
    for kind, image in (("anomaly", result.anomaly), ("lesionmask", result.lesion_mask),
                        ("pseudohealthy", result.pseudo_healthy)):
        written = nib.load(out / "maps" / f"obl_{kind}.nii.gz")
        assert image.shape == source.shape and np.array_equal(image.affine, source.affine)
        assert image.header.get_sform(coded=True)[1] == 2 and image.header.get_qform(coded=True)[1] == 0
        assert image.get_data_dtype() == written.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(written.dataobj), err_msg=kind)
    assert np.asanyarray(result.lesion_mask.dataobj).any()  # the tiny bundle flags something: a real comparison
    row = pd.read_parquet(out / "volumes.parquet").iloc[0]
    for column, value in result.statistics.items():
        if isinstance(value, (list, tuple, np.ndarray)):
            assert list(row[column]) == pytest.approx(list(value)), column
        elif value is None:
            assert row[column] is None or pd.isna(row[column]), column
        else:
            assert row[column] == pytest.approx(value), column
    assert len(result.lesions) == int(row["lesion_count"]) and result.brain_mask_source == row["brain_mask_source"]
    from_path = phanes_cli.predict(image_path, bundle=bundle, device="cpu", backend="torch")
    np.testing.assert_array_equal(np.asanyarray(from_path.anomaly.dataobj), np.asanyarray(result.anomaly.dataobj))


def test_predict_refuses_an_empty_volume(bundle: Path) -> None:
    empty = nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4))
    with pytest.raises(QualityError, match="quality check"):
        phanes_cli.predict(empty, bundle=bundle, device="cpu", backend="torch")


def test_predict_names_what_it_cannot_take(bundle: Path, tmp_path: Path) -> None:
    """A bare array, a folder, a 4D or 2D in-memory image: one clear error each, naming the argument or the
    in-memory image rather than a temporary file that no longer exists."""
    head = nib.load(write_head(tmp_path / "h.nii.gz", affines()["ras"], seed=2))
    data = np.asanyarray(head.dataobj).astype(np.float32)
    with pytest.raises(TypeError, match="image must be a NIfTI path or a nibabel image, not ndarray"):
        phanes_cli.predict(data, bundle=bundle, device="cpu", backend="torch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="brain_mask must be a NIfTI path or a nibabel image, not int"):
        phanes_cli.predict(head, bundle=bundle, brain_mask=1, device="cpu", backend="torch")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="is a folder, not a NIfTI file"):
        phanes_cli.predict(tmp_path, bundle=bundle, device="cpu", backend="torch")
    for array, reason in ((np.stack([data, data], -1), "4D image with 2 volumes"), (data[:, :, 0], "not 3D")):
        with pytest.raises(InputError, match=f"^in-memory image: .*{reason}"):
            phanes_cli.predict(nib.Nifti1Image(array, head.affine), bundle=bundle, device="cpu", backend="torch")
    mask = nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), head.affine)
    with pytest.raises(InputError, match=r"^in-memory brain mask: "):
        phanes_cli.predict(head, bundle=bundle, brain_mask=mask, device="cpu", backend="torch")


def test_predict_takes_any_nibabel_image(bundle: Path, tmp_path: Path) -> None:
    """An MGH image (FreeSurfer's format) is screened as the same data in NIfTI is."""
    head = nib.load(write_head(tmp_path / "h.nii.gz", affines()["ras"], seed=2))
    data = np.asanyarray(head.dataobj).astype(np.float32)
    as_mgh = phanes_cli.predict(nib.MGHImage(data, head.affine), bundle=bundle, device="cpu", backend="torch")
    as_nifti = phanes_cli.predict(nib.Nifti1Image(data, head.affine), bundle=bundle, device="cpu", backend="torch")
    assert as_mgh.statistics["lesion_burden_ml"] == pytest.approx(as_nifti.statistics["lesion_burden_ml"])
    np.testing.assert_array_equal(np.asanyarray(as_mgh.anomaly.dataobj), np.asanyarray(as_nifti.anomaly.dataobj))


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "8"])
def test_predict_checks_the_batch_size_as_screen_does(bundle: Path, tmp_path: Path, size: object) -> None:
    """One validator (`options.check_batch_size`) for the API and `phanes screen`: the same one-line error, raised
    before anything loads (`range()` raised ValueError at 0, and -1 returned no slices at all)."""
    from phanes_cli.errors import ConfigError
    from phanes_cli.screening.options import ScreenOptions

    head = write_head(tmp_path / "h.nii.gz", affines()["ras"], seed=2)
    message = f"batch size must be a whole number of slices >= 1, got {size!r}"
    with pytest.raises(ConfigError) as from_api:
        phanes_cli.predict(head, bundle=bundle, device="cpu", backend="torch", batch_size=size)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as from_screen:
        ScreenOptions(bundle=bundle, out=tmp_path / "out", batch_size=size).validate()  # type: ignore[arg-type]
    assert str(from_api.value) == str(from_screen.value) == message
