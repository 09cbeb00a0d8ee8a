"""`screen --layout bids` on a real small BIDS dataset, checked by the BIDS validator itself.

The dataset: real T1s from ../shared/data at 2.5 mm (a head with its skull, and two skull-stripped brains as
two sessions of a second subject, one with a `desc-brain_mask` derivative), participants.tsv and a sessions
file. The oracles: bids-validator-deno 3.0.2 (pinned in the test extra; run offline), the files and TSVs read
back here with plain Python, and the volumes table of the same run.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from nibabel.processing import resample_to_output

from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from tests._ray import HEAD_IP, RayCluster
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"
SOURCES = {"sub-01/anat/sub-01_T1w.nii.gz": SHARED_DATA / "head-t1" / "niivue_otsu_head_T1.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": SHARED_DATA / "healthy-t1" / "niimath_adult_T1.nii.gz",
           "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz": SHARED_DATA / "healthy-t1" / "antspy_colin27_ch2_T1.nii.gz"}
GIVEN_MASK = "derivatives/masks/sub-02/ses-2/anat/sub-02_ses-2_desc-brain_mask.nii.gz"
# Warnings the output keeps, and why (README, "BIDS-derivatives output"): phanes cannot name the authors.
EXPLAINED_WARNINGS = {"TOO_FEW_AUTHORS"}


def validate(root: Path) -> list[dict[str, Any]]:
    """The validator's issues for `root` (it runs offline: its schema ships inside the wheel)."""
    run = subprocess.run([str(VALIDATOR), "--format", "json", str(root)], capture_output=True, text=True,
                         timeout=300)
    assert run.stdout.startswith("{"), run.stderr[-2000:]
    return list(json.loads(run.stdout)["issues"]["issues"])


def _put(source: Path, target: Path) -> np.ndarray:
    """`source` resampled to 2.5 mm (fast to screen), float32, spatial units mm as scanners write them."""
    image = resample_to_output(nib.load(str(source)), voxel_sizes=(2.5, 2.5, 2.5), order=1)
    data = np.asarray(image.dataobj, dtype=np.float32)
    out = nib.Nifti1Image(data, image.affine)
    out.header.set_xyzt_units("mm", "sec")
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(target))
    return data


def build_dataset(root: Path) -> Path:
    """A valid raw BIDS dataset (the validator finds 0 errors in it) of real T1s, with covariates."""
    for rel, source in SOURCES.items():
        data = _put(source, root / rel)
        (root / rel.replace(".nii.gz", ".json")).write_text(json.dumps({"MagneticFieldStrength": 3}))
        if "ses-2" in rel:
            mask = nib.load(str(root / rel))
            brain = nib.Nifti1Image((data > 0.05 * data.max()).astype(np.uint8), mask.affine)
            brain.header.set_xyzt_units("mm", "sec")
            (root / GIVEN_MASK).parent.mkdir(parents=True)
            nib.save(brain, str(root / GIVEN_MASK))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "phanes test", "BIDSVersion": "1.9.0", "DatasetType": "raw", "Authors": ["A", "B"]}))
    (root / "derivatives" / "masks" / "dataset_description.json").write_text(json.dumps(
        {"Name": "masks", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}]}))
    (root / "README").write_text("Real T1-weighted images from public repositories, for testing phanes. " * 4)
    (root / "participants.tsv").write_text("participant_id\tsite\tgroup\tage\nsub-01\tA\tcontrol\t34\n"
                                           "sub-02\tB\tpatient\t61\n")
    (root / "participants.json").write_text(json.dumps({k: {"Description": k} for k in ("site", "group", "age")}))
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tscanner\nses-1\tprisma\nses-2\tskyra\n")
    (root / "sub-02" / "sub-02_sessions.json").write_text(json.dumps({"scanner": {"Description": "scanner"}}))
    return root


@pytest.fixture(scope="module")
def screened(cluster: RayCluster, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not all(p.is_file() for p in SOURCES.values()):
        pytest.skip(f"{SHARED_DATA} (head-t1, healthy-t1) is not present on this machine")
    if not VALIDATOR.is_file():
        pytest.skip("bids-validator-deno is not installed (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("bids_real")
    dataset, out = build_dataset(folder / "ds"), folder / "out"
    options = ScreenOptions(bundle=tiny_bundle, out=out, quiet=True, num_actors=1, node_ip=HEAD_IP,
                            layout="bids", outputs=frozenset({"anomaly", "lesion_mask", "pseudohealthy"}))
    summary = screen([str(dataset)], options)
    assert (summary.done, summary.failed) == (3, 0)
    return {"dataset": dataset, "out": out, "options": options}


def test_the_input_dataset_is_valid_and_the_output_has_no_errors(screened: dict[str, Any], tmp_path: Path) -> None:
    assert not [i for i in validate(screened["dataset"]) if i["severity"] == "error"]
    issues = validate(screened["out"])
    assert not [i for i in issues if i["severity"] == "error"], issues
    assert {i["code"] for i in issues} <= EXPLAINED_WARNINGS, issues
    unignored = tmp_path / "unignored"  # the validator does check: without .bidsignore it names what BIDS lacks
    shutil.copytree(screened["out"], unignored, ignore=shutil.ignore_patterns("parts", "*.parquet", "run.json"))
    (unignored / ".bidsignore").unlink()
    refused = {i["location"] for i in validate(unignored) if i["code"] == "NOT_INCLUDED"}
    stems = ("/sub-01/anat/sub-01", "/sub-02/ses-1/anat/sub-02_ses-1", "/sub-02/ses-2/anat/sub-02_ses-2")
    assert refused == {f"{stem}{end}" for stem in stems
                       for end in ("_desc-anomaly_map.nii.gz", "_desc-anomaly_map.json", "_burden.tsv")} | {
                           "/sub-02/sub-02_burden.tsv"}


def _sidecar(out: Path, stem: str, name: str) -> dict[str, Any]:
    return dict(json.loads((out / f"{stem}_{name}.json").read_text()))


def test_brain_masks_sidecars_and_what_the_root_holds(screened: dict[str, Any]) -> None:
    out, dataset = screened["out"], screened["dataset"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": dataset.as_uri()}]
    assert description["DatasetLinks"] == {"raw": dataset.as_uri()}
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "README.md", "dataset_description.json",
                                                    "failures.parquet", "lesions.parquet", "parts", "run.json",
                                                    "sub-01", "sub-02", "volumes.parquet"]  # no lock, no maps/
    expected = {"sub-01/anat/sub-01": ("model", False), "sub-02/ses-1/anat/sub-02_ses-1": ("threshold", True),
                "sub-02/ses-2/anat/sub-02_ses-2": ("file", True)}
    for stem, (source, stripped) in expected.items():
        raw = f"bids:raw:{stem}_T1w.nii.gz"
        brain = _sidecar(out, stem, "desc-brain_mask")
        given = [f"bids:raw:{GIVEN_MASK}"] if source == "file" else []
        assert (brain["BrainMaskSource"], brain["Type"], brain["SpatialReference"]) == (source, "Brain", raw)
        assert brain["Sources"] == [raw, *given]
        lesion = _sidecar(out, stem, "desc-lesion_mask")
        assert (lesion["Type"], lesion["Sources"]) == ("Lesion", [raw, f"bids::{stem}_desc-anomaly_map.nii.gz"])
        assert _sidecar(out, stem, "desc-pseudohealthy_T1w")["SkullStripped"] is stripped
    head = nib.load(str(out / "sub-01/anat/sub-01_desc-brain_mask.nii.gz"))
    brain_ml = np.count_nonzero(np.asarray(head.dataobj)) * float(np.prod(head.header.get_zooms()[:3])) / 1000
    assert 1000 < brain_ml < 1800  # deepbet's brain of an adult head, not the whole head
    given_mask = np.asarray(nib.load(str(dataset / GIVEN_MASK)).dataobj)
    written = np.asarray(nib.load(str(out / "sub-02/ses-2/anat/sub-02_ses-2_desc-brain_mask.nii.gz")).dataobj)
    assert np.array_equal(given_mask > 0, written > 0)  # the given mask, voxel for voxel


def test_burden_tables_and_covariates_match_the_volumes_table(screened: dict[str, Any]) -> None:
    out = screened["out"]
    volumes = {r["id"]: r for r in pq.read_table(out / "volumes.parquet").to_pylist()}
    tables = {"sub-01/anat/sub-01_burden.tsv": ["sub-01"],
              "sub-02/ses-1/anat/sub-02_ses-1_burden.tsv": ["sub-02_ses-1"],
              "sub-02/ses-2/anat/sub-02_ses-2_burden.tsv": ["sub-02_ses-2"],
              "sub-02/sub-02_burden.tsv": ["sub-02_ses-1", "sub-02_ses-2"]}  # a subject's sessions together
    for tsv, ids in tables.items():
        with open(out / tsv, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert [r["id"] for r in rows] == ids
        for row in rows:
            table = volumes[row["id"]]
            assert row["status"] == "ok" and row["brain_mask_source"] == table["brain_mask_source"]
            for column in ("brain_volume_ml", "lesion_burden_ml", "lesion_burden_fraction", "max_anomaly"):
                assert float(row[column]) == pytest.approx(table[column], rel=1e-12)
            assert int(row["lesion_count"]) == table["lesion_count"]
    schema = pq.read_schema(out / "volumes.parquet")
    assert (str(schema.field("age").type), str(schema.field("site").type)) == ("int64", "string")
    assert {v: (r["site"], r["group"], r["age"], r["scanner"]) for v, r in volumes.items()} == {
        "sub-01": ("A", "control", 34, None), "sub-02_ses-1": ("B", "patient", 61, "prisma"),
        "sub-02_ses-2": ("B", "patient", 61, "skyra")}


def test_a_resumed_run_changes_nothing(screened: dict[str, Any]) -> None:
    out = screened["out"]
    before = pq.read_table(out / "volumes.parquet")
    again = screen([str(screened["dataset"])], replace(screened["options"]))
    assert (again.done, again.skipped) == (0, 3)
    after = pq.read_table(out / "volumes.parquet")
    assert after.schema == before.schema and after.equals(before)
    assert not (out / ".phanes-screen.lock").exists() and not (out / "maps").exists()
