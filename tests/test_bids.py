"""BIDS inputs: a small BIDS dataset on disk (T1w, FLAIR, bold, derivatives with brain masks in two spaces,
a skull-stripped desc-brain_T1w, an FSL-named T1_brain); which files become images, which masks pair, and
the reason for every file left out. The oracle is the tree itself: what each file is, written here."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from phanes_cli.core.bundle import load_bundle
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.bids import is_bids_root, parse_filters, select_bids
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.screening.bids_derivative import start_layout
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from tests._ray import HEAD_IP, RayCluster
from tests.conftest import blob_volume
from tests.test_cli import phanes_in_process

RUN1 = "sub-03/ses-1/anat/sub-03_ses-1_acq-mprage_run-1"
RUN2 = "sub-03/ses-1/anat/sub-03_ses-1_acq-mprage_run-2"
IMAGES = {"sub-01": "sub-01/anat/sub-01_T1w.nii.gz", "sub-02_desc-brain": "sub-02/anat/sub-02_desc-brain_T1w.nii.gz",
          "sub-03_ses-1_acq-mprage_run-1": f"{RUN1}_T1w.nii.gz", "sub-03_ses-1_acq-mprage_run-2": f"{RUN2}_T1w.nii.gz"}
MASKS = {"sub-01": "derivatives/fsl/sub-01/anat/sub-01_desc-brain_mask.nii.gz",
         "sub-03_ses-1_acq-mprage_run-1": f"derivatives/fsl/{RUN1}_desc-brain_mask.nii.gz"}
UNUSED = {  # file -> words its reason must hold
    "sub-01/anat/sub-01_FLAIR.nii.gz": "suffix 'FLAIR'",
    "sub-01/func/sub-01_task-rest_bold.nii.gz": "suffix 'bold'",
    "sub-03/anat/T1_brain.nii.gz": "not a BIDS file name",
    "derivatives/fsl/sub-01/anat/sub-01_desc-brain_T1w.nii.gz": "derivatives",
    "derivatives/fsl/sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz": "space",
    "derivatives/fsl/sub-09/anat/sub-09_desc-brain_mask.nii.gz": "no matching image",
    "derivatives/fsl/sub-01/anat/sub-01_desc-wm_mask.nii.gz": "not a brain mask",
}


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    image = blob_volume((30, 34, 28))
    for rel in [*IMAGES.values(), *(f for f in UNUSED if not f.endswith("mask.nii.gz"))]:
        _nifti(root / rel, image)
    for rel in [*MASKS.values(), *(f for f in UNUSED if f.endswith("mask.nii.gz"))]:
        _nifti(root / rel, (image > 0).astype(np.uint8))
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    (root / "derivatives" / "fsl" / "dataset_description.json").write_text(
        json.dumps({"Name": "fsl", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    return root


def test_t1w_images_are_selected_with_their_brain_masks_and_entities(dataset: Path) -> None:
    assert is_bids_root(dataset) and not is_bids_root(dataset / "sub-01")
    selection = select_bids(dataset)
    rows = {r.id: r for r in selection.rows}
    assert {vid: str(r.image.relative_to(dataset)) for vid, r in rows.items()} == IMAGES
    assert {vid: str(r.brain_mask.relative_to(dataset)) for vid, r in rows.items() if r.brain_mask} == MASKS
    assert rows["sub-03_ses-1_acq-mprage_run-2"].extra == {"sub": "03", "ses": "1", "acq": "mprage", "run": "2"}
    assert rows["sub-01"].extra == {"sub": "01", "ses": None, "acq": None, "run": None}
    reasons = {str(s.path.relative_to(dataset)): s.reason for s in selection.skipped}
    assert set(reasons) == set(UNUSED)
    for rel, words in UNUSED.items():
        assert words in reasons[rel], (rel, reasons[rel])
    every_nifti = {str(Path(d, f).relative_to(dataset)) for d, _, files in os.walk(dataset) for f in files
                   if f.endswith((".nii", ".nii.gz"))}
    assert every_nifti == set(IMAGES.values()) | set(MASKS.values()) | set(UNUSED)  # every file accounted for


def test_suffix_and_filters_choose_other_images(dataset: Path) -> None:
    flair = select_bids(dataset, suffix="FLAIR")
    assert [r.id for r in flair.rows] == ["sub-01"] and flair.rows[0].image.name == "sub-01_FLAIR.nii.gz"
    run2 = select_bids(dataset, filters=parse_filters(["run=2", "acq=mprage"]))
    assert [r.id for r in run2.rows] == ["sub-03_ses-1_acq-mprage_run-2"]
    assert run2.rows[0].brain_mask is None  # the only mask of sub-03 belongs to run 1
    reasons = {s.path.name: s.reason for s in run2.skipped}
    assert "does not match --bids-filter run=2" in reasons["sub-03_ses-1_acq-mprage_run-1_T1w.nii.gz"]
    with pytest.raises(ConfigError, match="expected ENTITY=VALUE"):
        parse_filters(["run"])
    with pytest.raises(ConfigError, match="'colour' is not a BIDS entity"):
        select_bids(dataset, filters={"colour": "red"})


def test_data_prepare_on_a_bids_root(dataset: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    quiet = phanes_in_process("data", "prepare", dataset, "--out", manifest, "--skull-strip", "never")
    assert quiet.returncode == 0, quiet.stderr
    assert f"{len(UNUSED)} files found and not used" in quiet.stderr and "FLAIR" not in quiet.stderr
    table = pq.read_table(manifest).to_pydict()
    assert sorted(table["id"]) == sorted(IMAGES)
    sources = dict(zip(table["id"], table["brain_mask_source"], strict=True))
    assert sources == {vid: "file" if vid in MASKS else "threshold" for vid in IMAGES}  # every row says
    assert {(i, s, r) for i, s, r in zip(table["id"], table["sub"], table["run"], strict=True)} >= {
        ("sub-01", "01", None), ("sub-03_ses-1_acq-mprage_run-1", "03", "1")}
    verbose = phanes_in_process("data", "prepare", dataset, "--out", manifest, "--skull-strip", "never", "--verbose",
                     "--suffix", "T1w", "--bids-filter", "sub=01")
    assert verbose.returncode == 0, verbose.stderr
    assert pq.read_table(manifest).column("id").to_pylist() == ["sub-01"]
    assert "sub-01_FLAIR.nii.gz: suffix 'FLAIR'" in " ".join(verbose.stderr.split())


def test_bids_layout_refuses_what_it_cannot_name(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out")
    with pytest.raises(ConfigError, match="'case7' is not one"):
        start_layout(layout, "bids", ["sub-01", "case7"])
    with pytest.raises(ConfigError, match="'sub-02' and 'sub-02_desc-brain' would write the same files"):
        start_layout(layout, "bids", ["sub-02", "sub-02_desc-brain"])
    with pytest.raises(ConfigError, match="--layout 'flat' is not one of default, bids"):
        start_layout(layout, "flat", ["sub-01"])
    start_layout(layout, "default", ["case7"])  # the default layout takes any id and writes nothing
    assert not layout.bids and not (tmp_path / "out").exists()
    start_layout(layout, "bids", ["sub-01", "sub-03_ses-1_run-2"])
    assert layout.bids
    assert layout.map_path("sub-03_ses-1_run-2", "lesion_mask") == (
        tmp_path / "out" / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_run-2_desc-lesion_mask.nii.gz")
    with pytest.raises(ConfigError, match="holds a --layout bids run"):
        start_layout(layout, "default", ["sub-01"])


def test_bids_layout_refuses_a_default_run_but_not_its_leftover_temporary(tmp_path: Path) -> None:
    """A '.tmp-*.json' marker left by a SIGKILL is no commit; a real marker makes OUT a default-layout run."""
    for name, marker in (("killed", ".tmp-sub-01-0123456789ab.json"), ("committed", "case7.json")):
        (tmp_path / name / "parts" / "done").mkdir(parents=True)
        (tmp_path / name / "parts" / "done" / marker).write_text("{}")
    start_layout(OutputLayout(tmp_path / "killed"), "bids", ["sub-01"])
    with pytest.raises(ConfigError, match="has a default-layout run"):
        start_layout(OutputLayout(tmp_path / "committed"), "bids", ["sub-01"])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_screen_layout_bids_writes_a_derivatives_dataset(ray_head: RayCluster, dataset: Path, tiny_bundle: Path,
                                                         tmp_path: Path) -> None:
    bundle = tiny_bundle
    out = tmp_path / "out"
    options = ScreenOptions(bundle=bundle, out=out, address=ray_head.address, node_ip=HEAD_IP, quiet=True,
                            num_actors=1, layout="bids", skull_strip="never",
                            outputs=frozenset({"anomaly", "lesion_mask", "pseudohealthy"}))
    summary = screen([str(dataset)], options)
    assert (summary.done, summary.failed) == (4, 0)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "phanes"
    calibration = load_bundle(bundle).require_calibration()
    stems = {"sub-01": "sub-01/anat/sub-01", "sub-02_desc-brain": "sub-02/anat/sub-02",
             "sub-03_ses-1_acq-mprage_run-1": f"{RUN1}", "sub-03_ses-1_acq-mprage_run-2": f"{RUN2}"}
    for vid, stem in stems.items():
        for name in ("desc-anomaly_map", "desc-lesion_mask", "desc-pseudohealthy_T1w"):
            image = nib.load(str(out / f"{stem}_{name}.nii.gz"))
            assert image.shape == (30, 34, 28)
            sidecar = json.loads((out / f"{stem}_{name}.json").read_text())
            derived = [f"bids::{stem}_desc-anomaly_map.nii.gz"] if name == "desc-lesion_mask" else []
            assert sidecar["Sources"] == [f"bids:raw:{IMAGES[vid]}", *derived]
            assert sidecar["BundleHash"] == load_bundle(bundle).hash
            assert sidecar["Thresholds"]["anomaly_threshold"] == calibration.anomaly_threshold
        brain = json.loads((out / f"{stem}_desc-brain_mask.json").read_text())
        given = [f"bids:raw:{MASKS[vid]}"] if vid in MASKS else []
        assert brain["Sources"] == [f"bids:raw:{IMAGES[vid]}", *given] and brain["Type"] == "Brain"
        assert brain["BrainMaskSource"] == ("file" if vid in MASKS else "threshold")
    assert description["DatasetLinks"] == {"raw": dataset.as_uri()}
    assert not (out / "maps").exists() and not (out / ".phanes-screen.lock").exists()
    volumes = {r["id"]: r for r in pq.read_table(out / "volumes.parquet").to_pylist()}
    assert volumes["sub-01"]["brain_mask_source"] == "file"  # paired from derivatives/fsl
    assert volumes["sub-02_desc-brain"]["brain_mask_source"] == "threshold"
    run2 = volumes["sub-03_ses-1_acq-mprage_run-2"]
    assert (run2["sub"], run2["ses"], run2["acq"], run2["run"]) == ("03", "1", "mprage", "2")
    with pytest.raises(ConfigError, match="holds a --layout bids run"):
        screen([str(dataset)], replace(options, layout="default"))


def test_a_plain_folder_says_which_files_it_left_out(tmp_path: Path) -> None:
    """Outside BIDS the mask-word rule still applies (FSL's T1_brain is left out), but never silently."""
    folder = tmp_path / "fsl"
    _nifti(folder / "T1.nii.gz", blob_volume((30, 34, 28)))
    _nifti(folder / "T1_brain.nii.gz", blob_volume((30, 34, 28)))
    _nifti(folder / "T1_brain_mask.nii.gz", (blob_volume((30, 34, 28)) > 0).astype(np.uint8))
    run = phanes_in_process("data", "prepare", folder, "--out", tmp_path / "m.parquet", "--skull-strip", "never", "-v")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stderr.split())
    assert pq.read_table(tmp_path / "m.parquet").column("id").to_pylist() == ["T1"]
    assert "2 files found and not used" in text
    assert f"not used {folder / 'T1_brain.nii.gz'}: the file name reads as a mask" in text
