"""DICOM in: series written with pydicom from real NIfTI brains (../shared/data/ixi) go through dcm2niix into a
cache under the output; a 3D T1 series becomes a row with the source's voxels and geometry and its series
metadata, a 2D T2 series and a localizer are refused with their reasons (data prepare) or failure rows (screen).

The oracle is the source NIfTI itself, read with nibabel and reoriented here, and the tags the test wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from phanes_cli.inputs.dicom import rejection
from phanes_cli.inputs.discovery import prepare_manifest, resolve_with_unused
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from tests._dicom_series import SeriesTags, write_series
from tests._ray import HEAD_IP, RayCluster
from tests.conftest import SHARED_DATA, needs_shared

IXI = SHARED_DATA / "ixi" / "T1"
T1_ID = "P001_2_t1_mprage_sag"
T2 = SeriesTags(description="t2_tse_tra", number=3, acquisition_type="2D", echo_time_ms=95.0,
                repetition_time_ms=5000.0, inversion_time_ms=None, sequence_name="*tse2d1_15")
LOCALIZER = SeriesTags(description="AAHead_Scout", number=1, image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
                       repetition_time_ms=8.6, echo_time_ms=4.0, inversion_time_ms=None, sequence_name="*fl2d1")


def _sources() -> list[Path]:
    return sorted(IXI.glob("*_T1.nii.gz"))[:2]


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """One patient's folder: a 3D T1 (IXI head), a 2D T2 (every third slice of another IXI head) and a 3-slice
    localizer; returns the folder and the T1's rescale slope."""
    if not IXI.is_dir():
        pytest.skip("../shared/data/ixi is not present on this machine")
    folder = tmp_path_factory.mktemp("dicom") / "patient"
    t1, other = (nib.load(str(p)) for p in _sources())
    slope = write_series(t1, folder / "series2", SeriesTags())
    thick = nib.Nifti1Image(np.asarray(other.dataobj)[:, :, ::3], other.affine @ np.diag([1.0, 1.0, 3.0, 1.0]))
    write_series(thick, folder / "series3", T2)
    scout = nib.Nifti1Image(np.asarray(other.dataobj)[:, :, 40:43], other.affine)
    write_series(scout, folder / "series1", LOCALIZER)
    return folder, slope


@needs_shared()
def test_a_t1_series_becomes_a_row_with_the_source_voxels_geometry_and_metadata(
        dicom_folder: tuple[Path, float], tmp_path: Path) -> None:
    folder, slope = dicom_folder
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    rows, listed = prepare_manifest([str(folder)], tmp_path / "prep" / "manifest.parquet")
    assert [r.id for r in rows] == [T1_ID]
    row = read_manifest(tmp_path / "prep" / "manifest.parquet")[0]
    assert row.image.is_relative_to(tmp_path / "prep" / "dicom")  # the cache is under the output
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing beside the user's data
    source = nib.as_closest_canonical(nib.load(str(_sources()[0])))
    converted = nib.as_closest_canonical(nib.load(str(row.image)))
    assert converted.shape == source.shape
    np.testing.assert_allclose(converted.affine, source.affine, atol=1e-4)
    difference = np.abs(converted.get_fdata() - source.get_fdata())
    assert difference.max() <= slope / 2 + 1e-6  # int16 storage with the rescale slope the series carries
    assert row.extra == {"scanner_manufacturer": "Siemens", "scanner_model": "Prisma_fit", "field_strength_t": 3.0,
                         "sequence_name": "*tfl3d1_16ns", "series_description": "t1_mprage_sag", "series_number": 2,
                         "acquisition_date": "2024-03-15"}
    reasons = {r.id: r.reason for r in listed if not r.unused}
    assert set(reasons) == {"P001_3_t2_tse_tra", "P001_1_AAHead_Scout"}
    assert "series 3 (t2_tse_tra): a 2D acquisition" in reasons["P001_3_t2_tse_tra"]
    assert "localizer" in reasons["P001_1_AAHead_Scout"]
    stamp = row.image.stat().st_mtime_ns
    again, _ = prepare_manifest([str(folder)], tmp_path / "prep" / "manifest.parquet")
    assert [r.image for r in again] == [row.image] and row.image.stat().st_mtime_ns == stamp  # cache reused


@needs_shared()
def test_a_listing_without_a_cache_converts_nothing(dicom_folder: tuple[Path, float], tmp_path: Path) -> None:
    rows, listed = resolve_with_unused([str(dicom_folder[0])])
    assert rows == [] and listed == []


def test_series_that_are_not_usable_t1s_are_refused_with_their_reason() -> None:
    mprage = {"Modality": "MR", "MRAcquisitionType": "3D", "SeriesDescription": "t1_mprage_sag", "EchoTime": 0.00298,
              "RepetitionTime": 2.3, "InversionTime": 0.9, "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
              "BidsGuess": ["anat", "_acq-tfl3_run-2_T1w"]}
    bravo = {"Modality": "MR", "MRAcquisitionType": "3D", "SeriesDescription": "Sag BRAVO", "EchoTime": 0.003,
             "RepetitionTime": 0.008, "InversionTime": 0.45}
    shape = (176, 256, 256)
    assert rejection(mprage, shape) is None and rejection(bravo, shape) is None
    cases = {
        "modality CT": ({**mprage, "Modality": "CT"}, shape),
        "localizer": ({**mprage, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, shape),
        "derived": ({**mprage, "ImageType": ["DERIVED", "SECONDARY", "MPR"]}, shape),
        "2D acquisition": ({**mprage, "MRAcquisitionType": "2D"}, shape),
        "4D": (mprage, (*shape, 2)),
        "only 20 voxels": (mprage, (256, 256, 20)),
        "echo time 90 ms": ({**mprage, "EchoTime": 0.09, "InversionTime": None}, shape),
        "inversion time 2.5 s": ({**mprage, "InversionTime": 2.5, "BidsGuess": ["anat", "_FLAIR"]}, shape),
        "reads it as FLAIR": ({**mprage, "BidsGuess": ["anat", "_FLAIR"]}, shape),
        "names another contrast": ({**bravo, "SeriesDescription": "PD_space_sag"}, shape),
    }
    for words, (sidecar, size) in cases.items():
        reason = rejection(sidecar, size)
        assert reason is not None and words in reason, (words, reason)


@needs_shared()
@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_screen_converts_a_dicom_folder_into_out_with_failure_rows(ray_head: RayCluster, tiny_bundle: Path,
                                                                    dicom_folder: tuple[Path, float],
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(dicom_folder[0], folder)
    out = tmp_path / "out"
    options = ScreenOptions(bundle=tiny_bundle, out=out, address=ray_head.address, node_ip=HEAD_IP, quiet=True,
                            num_actors=1, skull_strip="never")
    summary = screen([str(folder)], options)
    assert (summary.total, summary.done, summary.failed) == (3, 1, 2)
    volumes = {v["id"]: v for v in pq.read_table(out / "volumes.parquet").to_pylist()}
    assert {vid: v["status"] for vid, v in volumes.items()} == {
        T1_ID: "ok", "P001_3_t2_tse_tra": "failed", "P001_1_AAHead_Scout": "failed"}
    screened = volumes[T1_ID]
    assert Path(screened["input_path"]).is_relative_to(out / "dicom")
    assert (screened["scanner_model"], screened["series_description"]) == ("Prisma_fit", "t1_mprage_sag")
    failures = {f["id"]: f for f in pq.read_table(out / "failures.parquet").to_pylist()}
    assert set(failures) == {"P001_3_t2_tse_tra", "P001_1_AAHead_Scout"}
    t2 = failures["P001_3_t2_tse_tra"]
    assert (t2["stage"], t2["path"], t2["series_description"]) == ("input", str(folder), "t2_tse_tra")
    assert "2D acquisition" in t2["message"]
    resumed = screen([str(folder)], options)
    assert (resumed.skipped, resumed.failed, resumed.done) == (1, 2, 0)
