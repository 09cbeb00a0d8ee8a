"""BIDS inputs beyond the images: participants.tsv / sessions.tsv covariates (typed, hostile files), template-space
images, the types of carried columns through resume and consolidation, and the run lock that leaves no file.

Oracles: the expected values are written here by hand from the TSV text each test writes."""

from __future__ import annotations

import fcntl
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from phanes_cli.errors import InputError, PhanesError
from phanes_cli.inputs.bids import OWN_OUTPUT, BidsQuery, select_bids
from phanes_cli.inputs.covariates import typed
from phanes_cli.inputs.discovery import resolve_with_unused
from phanes_cli.run_folder.commit import record_failure
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.session import run_lock
from tests._ray import HEAD_IP, RayCluster
from tests.conftest import blob_volume
from tests.test_cli import phanes_in_process

MNI = "MNI152NLin2009cAsym"


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


def _dataset(root: Path, images: list[str], participants: bytes | None, sessions: dict[str, str] | None = None) -> Path:
    for rel in images:
        _nifti(root / rel, blob_volume((30, 34, 28)))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    if participants is not None:
        (root / "participants.tsv").write_bytes(participants)
    for sub, text in (sessions or {}).items():
        (root / sub / f"{sub}_sessions.tsv").write_text(text)
    return root


IMAGES = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz",
          "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"]
# BOM, CRLF, blanks around names and cells, n/a and empty cells, reserved names (id, status, image),
# a code with leading zeros, sub-03 absent.
PARTICIPANTS = ("\ufeffparticipant_id \t site\tage\tweight\t status\tid\timage\tcode\r\n"
                "sub-01\t A \t34\t70.5\tok\tx1\tscan\t007\r\n"
                "sub-02\tB\tn/a\t80\t\ty2\tscan\t010\r\n").encode()
SESSIONS = {"sub-02": "session_id\tage\tscanner\nses-a\t61\tprisma\nses-b\tn/a\tskyra\n"}


def test_participants_and_sessions_columns_join_the_rows_typed(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", IMAGES, PARTICIPANTS, SESSIONS)
    extra = {r.id: {k: v for k, v in r.extra.items() if k not in ("acq", "run")} for r in select_bids(root).rows}
    common = {"site": None, "age": None, "weight": None, "status": None, "participants_id": None,
              "participants_image": None, "code": None, "sessions_age": None, "scanner": None}
    assert extra == {
        "sub-01": {**common, "sub": "01", "ses": None, "site": "A", "age": 34, "weight": 70.5, "status": "ok",
                   "participants_id": "x1", "participants_image": "scan", "code": "007"},
        "sub-02_ses-a": {**common, "sub": "02", "ses": "a", "site": "B", "weight": 80.0, "participants_id": "y2",
                         "participants_image": "scan", "code": "010", "sessions_age": 61, "scanner": "prisma"},
        "sub-02_ses-b": {**common, "sub": "02", "ses": "b", "site": "B", "weight": 80.0, "participants_id": "y2",
                         "participants_image": "scan", "code": "010", "scanner": "skyra"},
        "sub-03": {**common, "sub": "03", "ses": None},  # absent from participants.tsv: nulls
    }
    assert isinstance(extra["sub-01"]["age"], int) and isinstance(extra["sub-02_ses-a"]["weight"], float)


def test_only_newlines_end_a_line_other_unicode_separators_are_text(tmp_path: Path) -> None:
    """U+2028, U+2029, U+0085, form feed and a lone CR inside a cell are valid text, not line ends."""
    cell = "Z\u2028r\u0085i\u2029c\x0ch\rx"
    root = _dataset(tmp_path / "ds", IMAGES[:1], f"participant_id\tsite\tage\r\nsub-01\t{cell}\t34\r\n".encode())
    extra = select_bids(root).rows[0].extra
    assert (extra["site"], extra["age"]) == (cell, 34)


def test_a_column_takes_one_type_from_all_its_values() -> None:
    assert typed(["34", None, "-2", "+5"]) == [34, None, -2, 5]
    assert typed(["34", "61.5", "1e3"]) == [34.0, 61.5, 1000.0]
    assert typed(["007", "12"]) == ["007", "12"]  # leading zeros: a code, not a number
    assert typed(["1", "inf"]) == ["1", "inf"] and typed(["1", "nan"]) == ["1", "nan"]
    assert typed(["F", "3"]) == ["F", "3"] and typed([None, None]) == [None, None]


@pytest.mark.parametrize(("content", "words"), [
    (b"participant_id\tsite\nsub-01\tZ\xfcrich\n", "is not UTF-8 (byte 0xfc at offset 28)"),
    (b"participant_id\tsite\tage\nsub-01\tA\n", "line 2 has 2 cells, the header 3"),
    (b"subject\tsite\nsub-01\tA\n", "has no participant_id column (header: subject, site)"),
    (b"participant_id\tsite\nsub-01\tA\nsub-01\tB\n", "line 3 repeats participant_id 'sub-01'"),
    (b"participant_id\tsite\tsite\nsub-01\tA\tB\n", "repeats a column name"),
    (b"participant_id\tsite\n\nsub-01\tA\tB\n", "line 3 has 3 cells, the header 2"),  # blank lines count
    pytest.param("participant_id\t" + "\t".join(f"c{i}" for i in range(100_000)) + "\nsub-01" + "\t1" * 100_000,
                 "has 100,000 covariate columns; phanes carries at most 1,000", id="100k-columns"),
])
def test_a_malformed_participants_file_is_refused_in_one_line(tmp_path: Path, content: bytes | str,
                                                              words: str) -> None:
    root = _dataset(tmp_path / "ds", IMAGES[:1], content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=r"participants\.tsv") as caught:
        select_bids(root)
    assert words in str(caught.value)
    run = phanes_in_process("data", "prepare", root, "--out", tmp_path / "m.parquet", "--skull-strip", "never")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert words in " ".join(run.stderr.split())


def test_template_space_images_are_left_out_unless_asked_for(tmp_path: Path) -> None:
    """An fMRIPrep-like derivative given as the input: the native preprocessed T1w, not its MNI copy."""
    root = tmp_path / "fmriprep"
    native = "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    template = f"sub-01/anat/sub-01_space-{MNI}_desc-preproc_T1w.nii.gz"
    masks = {"native": "sub-01/anat/sub-01_desc-brain_mask.nii.gz",
             "template": f"sub-01/anat/sub-01_space-{MNI}_desc-brain_mask.nii.gz"}
    for rel in (native, template, "sub-01/anat/sub-01_dseg.nii.gz"):
        _nifti(root / rel, blob_volume((30, 34, 28)))
    for rel in masks.values():
        _nifti(root / rel, (blob_volume((30, 34, 28)) > 0).astype(np.uint8))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    chosen = select_bids(root)
    assert [(r.id, r.image, r.brain_mask) for r in chosen.rows] == [("sub-01_desc-preproc", root / native,
                                                                     root / masks["native"])]
    reasons = {str(s.path.relative_to(root)): s.reason for s in chosen.skipped}
    assert reasons[template] == (f"template space '{MNI}', not the subject's own "
                                 f"(screen it with --bids-filter space={MNI})")
    assert "space" in reasons[masks["template"]] and "suffix 'dseg'" in reasons["sub-01/anat/sub-01_dseg.nii.gz"]
    asked = select_bids(root, filters={"space": MNI})
    assert [(r.id, r.brain_mask) for r in asked.rows] == [(f"sub-01_space-{MNI}_desc-preproc",
                                                            root / masks["template"])]
    assert "does not match --bids-filter space" in {s.path: s.reason for s in asked.skipped}[root / native]


def test_carried_columns_of_parts_that_disagree_take_one_type(tmp_path: Path) -> None:
    """Part files written by different runs (participants.tsv edited between them): int and float make float."""
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    base = {"path": "x.nii.gz", "stage": "decode", "error_type": "InputError", "message": "bad", "bundle_hash": "h"}
    record_failure(layout, "a", {**base, "id": "a", "age": 34, "site": "A", "code": 7})
    record_failure(layout, "b", {**base, "id": "b", "age": 61.5, "code": "007"})
    record_failure(layout, "c", {**base, "id": "c"})
    consolidate(layout)
    for table in ("failures", "volumes"):
        read = pq.read_table(layout.table(table))
        assert [str(read.schema.field(c).type) for c in ("age", "site", "code")] == ["double", "string", "string"]
        assert read.select(["id", "age", "site", "code"]).to_pylist() == [
            {"id": "a", "age": 34.0, "site": "A", "code": "7"}, {"id": "b", "age": 61.5, "site": None, "code": "007"},
            {"id": "c", "age": None, "site": None, "code": None}]


def test_the_lock_file_goes_with_the_run_and_still_excludes_a_second_one(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path)
    with run_lock(layout):
        assert layout.lock.is_file()
        with pytest.raises(PhanesError, match="another `phanes screen` is writing to this folder"), run_lock(layout):
            pass
        late = open(layout.lock, "a+")  # noqa: SIM115 (closed below) a run that opened the file just before the first one ends
    assert not layout.lock.exists()
    with late, run_lock(layout):  # the next run makes a new file...
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ...so the old, removed one can be locked: it must not count
        with pytest.raises(PhanesError, match="another `phanes screen`"), run_lock(layout):
            pass
    assert not layout.lock.exists()


@pytest.mark.slow
def test_covariates_survive_resume_and_consolidation(cluster: RayCluster, tiny_bundle: Path, tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", IMAGES, PARTICIPANTS, SESSIONS)
    (root / IMAGES[2]).write_bytes(b"not a nifti")  # sub-02_ses-b fails: its failure row carries the covariates too
    out = tmp_path / "out"
    options = ScreenOptions(bundle=tiny_bundle, out=out, quiet=True, num_actors=1, node_ip=HEAD_IP,
                            skull_strip="never", layout="bids", bids=BidsQuery(filters=(("sub", "01"),)))
    first = screen([str(root)], options)
    assert (first.done, first.failed) == (1, 0)
    second = screen([str(root)], replace(options, bids=BidsQuery()))  # resumes sub-01 from the first run's parts
    assert (second.done, second.failed, second.skipped) == (2, 1, 1)
    volumes = pq.read_table(out / "volumes.parquet")
    types = {c: str(volumes.schema.field(c).type) for c in ("age", "weight", "site", "input_status", "code",
                                                           "sessions_age", "scanner", "sub", "ses")}
    assert types == {"age": "int64", "weight": "double", "site": "string", "input_status": "string",
                     "code": "string", "sessions_age": "int64", "scanner": "string", "sub": "string", "ses": "string"}
    rows = {r["id"]: (r["status"], r["site"], r["age"], r["weight"], r["input_status"], r["sessions_age"], r["code"])
            for r in volumes.to_pylist()}
    assert rows == {"sub-01": ("ok", "A", 34, 70.5, "ok", None, "007"),
                    "sub-02_ses-a": ("ok", "B", None, 80.0, None, 61, "010"),
                    "sub-02_ses-b": ("failed", "B", None, 80.0, None, None, "010"),
                    "sub-03": ("ok", None, None, None, None, None, None)}
    failures = pq.read_table(out / "failures.parquet")
    assert [str(failures.schema.field(c).type) for c in ("weight", "scanner")] == ["double", "string"]
    assert failures.select(["id", "weight", "scanner"]).to_pylist() == [
        {"id": "sub-02_ses-b", "weight": 80.0, "scanner": "skyra"}]
    failed = (out / "sub-02/ses-b/anat/sub-02_ses-b_burden.tsv").read_text().splitlines()
    assert len(failed) == 2 and failed[1].split("\t")[:4] == ["sub-02_ses-b", "failed", "n/a", "n/a"]
    subject = (out / "sub-02/sub-02_burden.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in subject[1:]] == [["sub-02_ses-a", "ok"], ["sub-02_ses-b", "failed"]]
    _edit_covariates_then_resume(root, out, replace(options, bids=BidsQuery()))


def _edit_covariates_then_resume(root: Path, out: Path, options: ScreenOptions) -> None:
    """The files edited after the volumes were screened: the resumed run (nothing left to screen) writes tables
    that say what the files say now, for done volumes and standing failures alike."""
    (root / "participants.tsv").write_text("participant_id\tsite\tage\thand\nsub-01\tC\t35.5\tL\n"
                                           "sub-02\tB\t50\tn/a\nsub-03\tD\tn/a\tR\n")  # weight, code... gone
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tscanner\nses-a\tprisma\nses-b\tvida\n")
    again = screen([str(root)], options)
    assert (again.done, again.failed, again.skipped) == (0, 1, 3)
    volumes = pq.read_table(out / "volumes.parquet")
    assert {"weight", "code", "sessions_age", "input_status", "participants_id"}.isdisjoint(volumes.column_names)
    assert [str(volumes.schema.field(c).type) for c in ("site", "age", "hand", "scanner")] == [
        "string", "double", "string", "string"]
    assert volumes.select(["id", "status", "site", "age", "hand", "scanner"]).to_pylist() == [
        {"id": "sub-01", "status": "ok", "site": "C", "age": 35.5, "hand": "L", "scanner": None},
        {"id": "sub-02_ses-a", "status": "ok", "site": "B", "age": 50.0, "hand": None, "scanner": "prisma"},
        {"id": "sub-02_ses-b", "status": "failed", "site": "B", "age": 50.0, "hand": None, "scanner": "vida"},
        {"id": "sub-03", "status": "ok", "site": "D", "age": None, "hand": "R", "scanner": None}]
    failures = pq.read_table(out / "failures.parquet")
    assert failures.select(["id", "site", "scanner"]).to_pylist() == [
        {"id": "sub-02_ses-b", "site": "B", "scanner": "vida"}]
    assert "weight" not in failures.column_names


def test_masks_in_out_never_come_back_as_given_masks(tmp_path: Path) -> None:
    """OUT inside the dataset (derivatives/phanes): its brain masks, written by an earlier run, are not inputs."""
    root = _dataset(tmp_path / "ds", IMAGES[:1], None)
    out = root / "derivatives" / "phanes"
    (out / "sub-01" / "anat").mkdir(parents=True)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "phanes", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "phanes"}]}))
    for rel in ("sub-01/anat/sub-01_desc-brain_mask.nii.gz", "maps/sub-01_anomaly.nii.gz"):
        _nifti(out / rel, (blob_volume((30, 34, 28)) > 0).astype(np.uint8))
    rows, unused = resolve_with_unused([str(root)], exclude=out)
    assert [(r.id, r.brain_mask) for r in rows] == [("sub-01", None)]
    assert {Path(u.path).relative_to(out).as_posix(): u.reason for u in unused} == {
        "sub-01/anat/sub-01_desc-brain_mask.nii.gz": OWN_OUTPUT, "maps/sub-01_anomaly.nii.gz": OWN_OUTPUT}
    paired, _ = resolve_with_unused([str(root)])  # the same mask outside OUT is a given brain mask
    assert paired[0].brain_mask == out / "sub-01/anat/sub-01_desc-brain_mask.nii.gz"
