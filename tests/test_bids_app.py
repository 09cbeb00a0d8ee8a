"""`phanes bids BIDS_DIR OUTPUT_DIR participant|group`: two participant jobs at once into one OUTPUT_DIR (two
driver processes on one real Ray head), then the group level's tables, run record and report.

The dataset is a small real BIDS tree: two IXI heads (../shared/data/ixi) as sub-01 and sub-02 T1w images and
their ages in participants.tsv; the tiny untrained bundle screens them. The oracle is the tree itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pyarrow.parquet as pq
import pytest

from phanes_cli.errors import PhanesError
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.screening.bids_app import PARTICIPANTS, _publish, group
from phanes_cli.screening.session import run_lock
from tests._ray import HEAD_IP, RayCluster
from tests.conftest import SHARED_DATA, needs_shared
from tests.test_cli import phanes_in_process

IXI = SHARED_DATA / "ixi" / "T1"
AGES = {"01": 46.71, "02": 24.28}
PARTICIPANT = """
import sys
from pathlib import Path
from phanes_cli.screening.bids_app import participant
from phanes_cli.screening.options import ScreenOptions
options = ScreenOptions(bundle=Path(sys.argv[3]), out=Path(sys.argv[2]), address=sys.argv[4], node_ip=sys.argv[5],
                        quiet=True, num_actors=1, skull_strip="never")
summaries = participant(Path(sys.argv[1]), Path(sys.argv[2]), [sys.argv[6]], options)
sys.exit(max(s.exit_code for s in summaries))
"""


def _dataset(root: Path) -> Path:
    heads = sorted(IXI.glob("*_T1.nii.gz"))[:2]
    for label, head in zip(AGES, heads, strict=True):
        target = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        target.parent.mkdir(parents=True)
        nib.save(nib.load(str(head)), str(target))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "ixi pair", "BIDSVersion": "1.9.0"}))
    rows = "".join(f"sub-{label}\t{age}\n" for label, age in AGES.items())
    (root / "participants.tsv").write_text("participant_id\tage\n" + rows)
    return root


@needs_shared()
def test_participant_labels_follow_the_bids_apps_form(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    run = phanes_in_process("bids", root, tmp_path / "out", "participant", "--bundle", tiny_bundle,
                            "--participant-label", "01", "sub-07", "99")
    assert run.returncode == 2 and "no T1w image of participant(s) 07, 99" in run.stderr
    run = phanes_in_process("bids", root, tmp_path / "out", "group")
    assert run.returncode == 2 and "no participant-level results" in run.stderr


@needs_shared()
@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")
def test_parallel_participants_then_group_tables_and_report(ray_head: RayCluster, tiny_bundle: Path,
                                                            tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    out = root / "derivatives" / "phanes"  # inside the dataset, as BIDS Apps are often run
    jobs = [subprocess.Popen([sys.executable, "-c", PARTICIPANT, str(root), str(out), str(tiny_bundle),
                              ray_head.address, HEAD_IP, label], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for label in AGES]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
    for label in AGES:
        anat = out / f"sub-{label}" / "anat"
        assert (anat / f"sub-{label}_desc-lesion_mask.nii.gz").is_file()
        assert (anat / f"sub-{label}_desc-brain_mask.nii.gz").is_file()
        assert (out / PARTICIPANTS / f"sub-{label}" / "volumes.parquet").is_file()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["DatasetLinks"] == {"raw": root.as_uri()}
    assert PARTICIPANTS in (out / ".bidsignore").read_text().split()
    assert not (out / "volumes.parquet").exists()  # the participants wrote no shared table

    with run_lock(OutputLayout(out / PARTICIPANTS / "sub-02")), pytest.raises(PhanesError, match="another"):
        group(out)  # a participant still running: refused, nothing merged
    assert not (out / "volumes.parquet").exists()

    run = phanes_in_process("bids", root, out, "group")
    assert run.returncode == 0, run.stderr
    volumes = pq.read_table(out / "volumes.parquet").to_pylist()
    assert [(v["id"], v["status"], v["age"]) for v in volumes] == [("sub-01", "ok", 46.71), ("sub-02", "ok", 24.28)]
    assert pq.read_table(out / "lesions.parquet").column_names[0] == "id"
    record = json.loads((out / "run.json").read_text())
    assert record["level"] == "group" and sorted(record["participants"]) == ["sub-01", "sub-02"]
    assert record["counts"]["done"] == 2
    assert (out / "sub-01" / "anat" / "sub-01_burden.tsv").is_file()
    assert "sub-02" in (out / "report.html").read_text()


def test_publishing_links_each_file_and_drops_what_the_run_no_longer_has(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = out / PARTICIPANTS / "sub-01"
    for name, text in (("dataset_description.json", "{}"), ("README.md", "readme")):
        run.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    anat = run / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_desc-lesion_mask.nii.gz").write_bytes(b"first")
    (anat / "sub-01_desc-pseudohealthy_T1w.nii.gz").write_bytes(b"dropped later")
    _publish(run, out, "01")
    published = out / "sub-01" / "anat" / "sub-01_desc-lesion_mask.nii.gz"
    assert published.read_bytes() == b"first" and published.stat().st_ino == (anat / published.name).stat().st_ino
    (anat / "sub-01_desc-pseudohealthy_T1w.nii.gz").unlink()
    (anat / "sub-01_desc-lesion_mask.nii.gz").unlink()
    (anat / "sub-01_desc-lesion_mask.nii.gz").write_bytes(b"second")  # a rerun writes a new file
    _publish(run, out, "01")
    assert published.read_bytes() == b"second"
    assert sorted(p.name for p in (out / "sub-01" / "anat").iterdir()) == ["sub-01_desc-lesion_mask.nii.gz"]
    assert (out / "README.md").read_text() == "readme" and PARTICIPANTS in (out / ".bidsignore").read_text()
