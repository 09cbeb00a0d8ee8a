"""The brain mask a volume was screened in is an output of every run (both layouts), named in volumes.parquet
with its source, and what `phanes stats` and the report read; every lesion row carries its location."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from phanes_cli.cohort_report.cases import BRAIN_MARGIN_MM, load_case
from phanes_cli.cohort_report.page import render_report
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.locations import CSF_CONTACTS, LOCATION_CLASSES
from phanes_cli.core.statistics import LOCATION_BURDEN_COLUMNS
from phanes_cli.infra.atomic import write_parquet
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    VOLUME_SCHEMA,
    table_from_rows,
    with_extra_columns,
)
from phanes_cli.screening.actors import InferenceActor
from phanes_cli.screening.bids_derivative import start_layout
from phanes_cli.screening.restat import restat_volume
from phanes_cli.screening.tasks import WriteJob, decode_volume, write_volume
from tests._tiny_cohort import write_cohort


def _screen(bundle: Path, row: ManifestRow, out: Path) -> dict:  # type: ignore[type-arg]
    """One volume through screening's decode, inference and write stages (no Ray); its volume row."""
    model = load_bundle(bundle)
    decoded, slices, context = decode_volume(row, model.config.preprocess, 10**9, "never")
    assert decoded.failure is None
    inferred, maps = InferenceActor(str(bundle), model.hash, "torch", "cpu", 1, 4, True, None).infer(slices)
    job = WriteJob(row=row, out=out, outputs=frozenset({"anomaly", "lesion_mask"}),
                   calibration=model.require_calibration(), backend="torch", bundle_hash=model.hash)
    assert write_volume(job, decoded, inferred, context, maps).failure is None
    return pq.read_table(OutputLayout(out).part("volumes", row.id)).to_pylist()[0]


def _given(tmp_path: Path, vid: str) -> ManifestRow:
    """A subject with a brain mask file that is not the threshold rule's mask: its upper half only."""
    write_cohort(tmp_path / "in", n_train=1, n_val=0)
    image, mask = tmp_path / "in" / "sub0.nii.gz", tmp_path / "in" / "sub0_brain.nii.gz"
    source = nib.load(mask)
    data = np.asarray(source.dataobj).copy()
    data[:, :, : data.shape[2] // 2] = 0
    half = tmp_path / "in" / "sub0_half.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine), str(half))
    return ManifestRow(id=vid, image=image, brain_mask=half)


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj) > 0


@pytest.mark.parametrize("layout_name", ["default", "bids"])
def test_both_layouts_write_the_mask_used(tiny_bundle: Path, tmp_path: Path, one_thread: None,
                                          layout_name: str) -> None:
    vid = "sub-01" if layout_name == "bids" else "sub0"
    row = _given(tmp_path, vid)
    layout = OutputLayout(tmp_path / "run")
    layout.root.mkdir()
    start_layout(layout, layout_name, [vid])
    screened = _screen(tiny_bundle, row, layout.root)
    written = layout.map_path(vid, "brain_mask")
    expected = {"default": "maps/sub0_brainmask.nii.gz", "bids": "sub-01/anat/sub-01_desc-brain_mask.nii.gz"}
    assert screened["brain_mask_path"] == expected[layout_name]
    assert (layout.root / screened["brain_mask_path"]) == written
    assert screened["brain_mask_source"] == "file"
    assert np.array_equal(_mask(written), _mask(row.brain_mask))  # the given file, voxel for voxel
    assert nib.load(str(written)).header.get_data_dtype() == np.uint8
    assert all(screened[c] is not None for c in LOCATION_BURDEN_COLUMNS.values())


def test_stats_and_report_read_the_mask_used(tiny_bundle: Path, tmp_path: Path, one_thread: None) -> None:
    row = _given(tmp_path, "sub0")
    layout = OutputLayout(tmp_path / "run")
    screened = _screen(tiny_bundle, row, layout.root)
    lesions = pq.read_table(layout.part("lesions", "sub0")).to_pylist()
    assert screened["lesion_count"] > 0  # the untrained bundle flags tissue: lesions to place
    assert {r["location"] for r in lesions} <= set(LOCATION_CLASSES)
    assert {r["csf_contact"] for r in lesions} <= set(CSF_CONTACTS)
    assert all(0.0 <= r["csf_fraction"] <= 1.0 for r in lesions)
    by_place = {c: sum(r["volume_ml"] for r in lesions if r["location"] == p)
                for p, c in LOCATION_BURDEN_COLUMNS.items()}
    assert by_place == pytest.approx({c: screened[c] for c in LOCATION_BURDEN_COLUMNS.values()})

    # `phanes stats` applies the lesion rule inside the written mask: shrink it, and no lesion lies outside
    brain_path = layout.map_path("sub0", "brain_mask")
    image = nib.load(str(brain_path))
    smaller = np.asarray(image.dataobj).copy()
    smaller[: smaller.shape[0] // 2] = 0
    nib.save(nib.Nifti1Image(smaller, image.affine, image.header), str(brain_path))
    model = load_bundle(tiny_bundle)
    _, restated = restat_volume(screened, layout, model.require_calibration(), OutputLayout(tmp_path / "stats"))
    mask = _mask(tmp_path / "stats" / "maps" / "sub0_lesionmask.nii.gz")
    assert mask.any() and not (mask & (smaller == 0)).any()
    assert restated and all(r["location"] in LOCATION_CLASSES for r in restated)

    # the report draws the mask used, cropped to it
    case = load_case(layout, screened)
    assert case.brain_source == "mask used: the given brain mask file"
    found = np.argwhere(case.brain)
    margin = np.ceil(BRAIN_MARGIN_MM / np.asarray(case.zooms)).astype(int)
    assert np.all(found.min(axis=0) <= margin) and np.all(np.array(case.brain.shape) - 1 - found.max(axis=0) <= margin)
    assert case.brain.sum() == smaller.astype(bool).sum()
    write_parquet(layout.table("volumes"), table_from_rows([screened], with_extra_columns(VOLUME_SCHEMA, [screened])))
    write_parquet(layout.table("lesions"), table_from_rows(lesions, LESION_SCHEMA))
    write_parquet(layout.table("failures"), table_from_rows([], FAILURE_SCHEMA))
    result = render_report(layout.root, top=1)
    assert "Lesion burden by location" in result.html.read_text()
    page = result.pages[0].read_text()
    assert "brain outline (mask used: the given brain mask file)" in page and "brain mask used</a>" in page
    listed = re.findall(r"<tr><td>(\d+)</td><td>[\d.]+</td><td>([a-z ]+)</td><td>([a-z]+)</td>", page)
    assert listed[:3] == [(str(r["lesion_index"]), r["location"].replace("_", " "), r["csf_contact"])
                          for r in lesions[:3]]
