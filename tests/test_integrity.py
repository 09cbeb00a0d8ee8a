"""Integrity and security (issue 23): no write outside the run, no silent collision, recompute or lost row,
no crash on hostile text, and a check that an input is a T1-weighted brain at all.

Each case is built on disk and asserts its outcome: a PhanesError naming the problem, a failure row, or the
right result computed here independently (numpy thresholds, file bytes, the absence of files outside the
run). The Ray runs of screening are in test_screening*.py; these cases reach the same functions directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phanes_cli.config import MAX_SHOWN, load_config
from phanes_cli.core.bundle import INDEX_FILE, load_bundle, seal_index, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import Volume, load_volume
from phanes_cli.errors import BundleError, ConfigError, InputError
from phanes_cli.infra.folders import claim_folder
from phanes_cli.inputs.discovery import resolve_inputs
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.inputs.quality import FATAL, check_volume
from phanes_cli.run_folder.commit import commit_volume, is_done
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout, file_stem
from phanes_cli.run_folder.schemas import manifest_columns
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.plan import plan_volumes
from phanes_cli.screening.restat import run_stats
from phanes_cli.screening.run_log import Counts, ProgressDisplay, print_summary
from tests.test_cli import phanes_in_process
from tests.test_screening import affines, write_head

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# ids that leave the run, and ids whose file names would read as something else (a right-to-left override makes
# "scan<U+202E>lmth.exe" display as "scanexe.html"; a newline splits a listing line)
ESCAPES = ["x/../../../../escape", "./../abs", "..", "a\\b", "scan\u202elmth.exe", "two\nlines", "zero\u200bwidth"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle  # the session's (conftest): copied before any change


# ---------------------------------------------------------------------------------------------------------
# `phanes stats` on a run folder received from someone else
# ---------------------------------------------------------------------------------------------------------


def _anomaly(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros((20, 20, 20), np.float32)
    data[4:16, 4:16, 4:16] = rng.uniform(0.01, 1.0, (12, 12, 12))
    return data


def _run(root: Path, rows: list[dict[str, object]], run_threshold: float) -> Path:
    """A screening OUT by hand: run.json, anomaly maps of the valid ids, volumes.parquet with `rows`."""
    layout = OutputLayout(root)
    layout.ensure()
    calibration = {"mask_threshold": 0.5, "anomaly_threshold": run_threshold, "n_slices": 1, "n_volumes": 1}
    layout.run_manifest.write_text(json.dumps({"bundle": {"calibration": calibration, "hash": "second"}}))
    for i, row in enumerate(rows):
        if row["id"] and "/" not in str(row["id"]) and row["id"] not in ("..", "."):
            nib.save(nib.Nifti1Image(_anomaly(i), np.eye(4)), str(root / "maps" / f"{row['id']}_anomaly.nii.gz"))
    full = [{"status": "ok", "input_path": "/in/x.nii.gz", "bundle_hash": "h", "brain_volume_ml": 1.7,
             "max_anomaly": 1.0, "mean_anomaly": 0.5, "mask_threshold": 0.5, "min_lesion_ml": 0.0, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full), layout.table("volumes"))
    return root


def test_stats_ids_from_the_table_never_write_outside_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path / "deep" / "er" / "run", [{"id": "good", "anomaly_threshold": 0.5},
                                                  *({"id": bad, "anomaly_threshold": 0.5} for bad in ESCAPES)], 0.5)
    before = set(tmp_path.rglob("*"))
    result = run_stats(run)
    written = set(tmp_path.rglob("*")) - before
    assert written and all(run / "stats" in p.parents or p == run / "stats" for p in written)
    failures = pq.read_table(result.tables["failures"]).to_pylist()
    assert sorted(f["id"] for f in failures) == sorted(ESCAPES)
    assert all(f["error_type"] == "InputError" and "file name" in f["message"] for f in failures)
    assert any("U+202E" in f["message"] for f in failures)
    assert (result.volumes, result.failed) == (1 + len(ESCAPES), len(ESCAPES))


def test_stats_on_null_ids_and_a_garbage_table_ends_as_rows_or_one_error(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", [{"id": "good", "anomaly_threshold": 0.5}, {"id": None, "anomaly_threshold": 0.5}],
               0.5)
    result = run_stats(run)
    assert [f["id"] for f in pq.read_table(result.tables["failures"]).to_pylist()] == [None]
    (run / "volumes.parquet").write_bytes(b"PAR1 not a table")
    with pytest.raises(InputError, match="not a readable Parquet table"):
        run_stats(run, out=tmp_path / "again")


def test_stats_refuses_an_out_that_is_the_run_or_someone_elses_and_a_link_out_of_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", [{"id": "good", "anomaly_threshold": 0.5}], 0.5)
    table_bytes = (run / "volumes.parquet").read_bytes()
    with pytest.raises(InputError, match=r"not a `phanes stats` output"):
        run_stats(run, out=run)  # would overwrite the run's masks and tables
    assert (run / "volumes.parquet").read_bytes() == table_bytes
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match=r"notes\.txt"):
        run_stats(run, out=other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    first = run_stats(run, out=tmp_path / "mine")
    again = run_stats(run, out=tmp_path / "mine")  # its own earlier output: accepted, same tables
    assert pq.read_table(again.tables["volumes"]).equals(pq.read_table(first.tables["volumes"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "stats").symlink_to(outside)  # a received run whose stats folder leads elsewhere
    with pytest.raises(InputError, match="resolves outside"):
        run_stats(run)
    assert not list(outside.iterdir())


def test_stats_keeps_each_volumes_own_calibration(tmp_path: Path) -> None:
    """Two bundles in one OUT: the first bundle's volume is not re-thresholded at the second's threshold."""
    run = _run(tmp_path / "run", [{"id": "first", "anomaly_threshold": 0.3, "bundle_hash": "one"},
                                  {"id": "second", "anomaly_threshold": 0.8, "bundle_hash": "two"}], 0.8)
    result = run_stats(run, out=tmp_path / "s")
    rows = {r["id"]: r for r in pq.read_table(result.tables["volumes"]).to_pylist()}
    for i, (vid, threshold) in enumerate((("first", 0.3), ("second", 0.8))):
        expected = _anomaly(i) >= threshold  # the oracle: every voxel of the map is > 0 inside its cube
        written = np.asarray(nib.load(str(tmp_path / "s" / "maps" / f"{vid}_lesionmask.nii.gz")).dataobj) > 0
        np.testing.assert_array_equal(written, expected)
        assert rows[vid]["anomaly_threshold"] == threshold
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["per_volume_thresholds"] is True
    lowered = run_stats(run, out=tmp_path / "t", threshold=0.5)  # an explicit threshold applies to every volume
    assert {r["anomaly_threshold"] for r in pq.read_table(lowered.tables["volumes"]).to_pylist()} == {0.5}


# ---------------------------------------------------------------------------------------------------------
# Names, collisions and the commit protocol
# ---------------------------------------------------------------------------------------------------------


def test_ids_sharing_a_hashed_file_stem_are_refused(tmp_path: Path) -> None:
    long_id = "A" * 300
    short_id = file_stem(long_id)  # 97 bytes: the long id's hashed stem, taken verbatim as another id
    assert len(short_id.encode()) < 120 and file_stem(short_id) == short_id
    image = write_head(tmp_path / "h.nii.gz", affines()["ras"], seed=1)
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    options = ScreenOptions(bundle=tmp_path, out=layout.root)
    rows = [ManifestRow(id=long_id, image=image), ManifestRow(id=short_id, image=image)]
    with pytest.raises(InputError, match="would share the file name"):
        plan_volumes(rows, layout, options, "k", "h")
    layout.done_marker(long_id).write_text(json.dumps({"id": long_id}))  # an earlier run committed the long id
    with pytest.raises(InputError, match="shares its file name"):
        plan_volumes([rows[1]], layout, options, "k", "h")
    listing = tmp_path / "ids.csv"
    listing.write_text(f"id,image\n{long_id},{image}\n{short_id},{image}\n")
    assert [r.id for r in resolve_inputs([str(listing)])] == [long_id, short_id]  # ids themselves are fine


def _committed(tmp_path: Path) -> tuple[OutputLayout, Path, tuple[str, ...]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    image = tmp_path / "a.nii.gz"
    image.write_bytes(b"x")
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    outputs = ("anomaly", "lesion_mask")
    for kind in outputs:
        layout.map_path("a", kind).write_bytes(b"nifti bytes")
    for path in layout.brain_mask_files("a"):  # every run writes the brain mask it used
        path.write_bytes(b"nifti bytes")
    marker = {"id": "a", "input_path": str(image), "input_signature": [1, image.stat().st_mtime_ns],
              "bundle_hash": "h1", "bundle_key": "k1", "outputs": list(outputs)}
    commit_volume(layout, "a", {"id": "a", "input_path": str(image), "status": "ok", "lesion_count": 1},
                  [{"id": "a", "lesion_index": 1, "voxel_count": 3}], marker)
    return layout, image, outputs


def test_a_part_file_damaged_after_its_commit_is_redone_and_never_dropped(tmp_path: Path) -> None:
    layout, image, outputs = _committed(tmp_path)
    assert is_done(layout, "a", image, "k1", outputs)
    part = layout.part("volumes", "a")
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    part.write_bytes(bytes(raw))
    assert not is_done(layout, "a", image, "k1", outputs)  # resume redoes it
    part.write_bytes(b"PAR1 garbage PAR1")  # unreadable: consolidation must say so
    tables = consolidate(layout)
    assert tables["damaged"] == 1
    volumes = pq.read_table(layout.table("volumes")).to_pylist()
    failures = pq.read_table(layout.table("failures")).to_pylist()
    assert [(v["id"], v["status"]) for v in volumes] == [("a", "failed")]
    assert [(f["id"], f["error_type"], f["retry_on_resume"], f["path"]) for f in failures] == [
        ("a", "DamagedOutput", True, str(image))]
    map_file = layout.map_path("a", "anomaly")
    assert not map_file.exists()  # a failed volume leaves no maps
    layout2, image2, outputs2 = _committed(tmp_path / "second")
    layout2.map_path("a", "anomaly").write_bytes(b"nifti")  # a map truncated after the commit
    assert not is_done(layout2, "a", image2, "k1", outputs2)


def test_resume_keys_on_weights_config_and_calibration_not_the_resealed_index(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    import shutil

    shutil.copytree(bundle, copy)
    first = load_bundle(copy)
    (copy / "engines").mkdir(exist_ok=True)
    (copy / "engines" / "graph.onnx").write_bytes(b"exported graph")
    seal_index(copy)  # what `phanes export` and `bench` do
    resealed = load_bundle(copy)
    assert resealed.hash != first.hash and resealed.content_key == first.content_key
    layout, image, outputs = _committed(tmp_path)
    marker = json.loads(layout.done_marker("a").read_text())
    layout.done_marker("a").write_text(json.dumps({**marker, "bundle_key": first.content_key}))
    assert is_done(layout, "a", image, resealed.content_key, outputs)  # a re-export redoes nothing
    cal = first.require_calibration()
    write_calibration(copy, Calibration(cal.mask_threshold, cal.anomaly_threshold * 1.5))
    recalibrated = load_bundle(copy)
    assert recalibrated.content_key != first.content_key
    assert not is_done(layout, "a", image, recalibrated.content_key, outputs)  # a new calibration redoes all


def test_a_resealed_bundle_with_binary_config_is_a_bundle_error(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "config.json").write_bytes(b"\xff\xfe\x00\x81 binary")
    index = json.loads((copy / INDEX_FILE).read_text())
    import hashlib

    index["files"]["config.json"] = hashlib.sha256((copy / "config.json").read_bytes()).hexdigest()
    (copy / INDEX_FILE).write_text(json.dumps(index))  # tampered, then re-sealed by hand
    with pytest.raises(BundleError, match=r"config\.json: not a readable JSON config"):
        load_bundle(copy)


# ---------------------------------------------------------------------------------------------------------
# Output folders phanes did not make
# ---------------------------------------------------------------------------------------------------------


def test_screen_refuses_a_bids_dataset_or_the_input_folder_as_out(bundle: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "bids"
    write_head(dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz", affines()["ras"], seed=3)
    (dataset / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.8.0"}')
    (dataset / ".bidsignore").write_text("extra/\n")
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    for layout in ("default", "bids"):
        with pytest.raises(InputError, match="not a `phanes screen` run"):
            screen([str(dataset)], ScreenOptions(bundle=bundle, out=dataset, layout=layout, quiet=True))
        with pytest.raises(InputError, match="not a `phanes screen` run"):
            screen([str(tmp_path / "bids" / "sub-01")], ScreenOptions(bundle=bundle, out=dataset, layout=layout))
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before  # nothing written or replaced
    plain = tmp_path / "plain"
    write_head(plain / "s1.nii.gz", affines()["ras"], seed=4)
    with pytest.raises(InputError, match=r"s1\.nii\.gz"):  # `screen DIR --out DIR`: never its own maps as subjects
        screen([str(plain)], ScreenOptions(bundle=bundle, out=plain))
    assert sorted(p.name for p in plain.iterdir()) == ["s1.nii.gz"]


def test_claim_folder_rules(tmp_path: Path) -> None:
    assert claim_folder(tmp_path / "new" / "deeper", ("run.json",), "x").is_dir()
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", ("run.json",), "x").is_dir()
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "run.json").write_text("{}")
    (tmp_path / "own" / "maps").mkdir()
    assert claim_folder(tmp_path / "own", ("run.json",), "x").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        claim_folder(tmp_path / "file", ("run.json",), "x")


# ---------------------------------------------------------------------------------------------------------
# Tables, manifests and configs with hostile content
# ---------------------------------------------------------------------------------------------------------


def test_a_csv_of_a_header_and_100000_blank_lines_is_an_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("id,image\n" + "\n" * 100_000)
    started = time.monotonic()
    with pytest.raises(InputError, match="no rows"):
        resolve_inputs([str(listing)])
    assert time.monotonic() - started < 10


def test_status_and_input_status_columns_are_both_kept() -> None:
    columns = manifest_columns({"status": "user status", "input_status": "user input_status", "site": "A"})
    assert sorted(columns.values()) == ["A", "user input_status", "user status"]
    assert columns["input_status"] == "user input_status" and "status" not in columns


def test_config_alias_bomb_and_deep_nesting_are_quick_bounded_config_errors(tmp_path: Path) -> None:
    anchors = "[&a [x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"&{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)) + ", *i]"
    (tmp_path / "bomb.yaml").write_text(f"name: {anchors}\n")  # 9^9 leaves when expanded
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    (tmp_path / "long.yaml").write_text("mask:\n  clahe_clip: " + "y" * 1_000_000 + "\n")
    for name, match in (("bomb", "expected"), ("deep", "nested too deeply"), ("long", "expected")):
        started = time.monotonic()
        with pytest.raises(ConfigError, match=match) as caught:
            load_config(tmp_path / f"{name}.yaml")
        assert time.monotonic() - started < 30
        assert len(str(caught.value)) < len(str(tmp_path)) + 3 * MAX_SHOWN, name


def test_rich_markup_in_paths_and_messages_is_printed_not_parsed(tmp_path: Path) -> None:
    folder = tmp_path / "x[" / "b]y[bold]"  # the path reads x[/b]y[bold]
    folder.mkdir(parents=True)
    config = folder / "[red]c.yaml"
    config.write_text("name: '[/b][red]'\n")
    run = phanes_in_process("config", "validate", config)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    shown = (run.stdout + run.stderr).replace("\n", "")
    assert "x[/b]y[bold]/[red]c.yaml" in shown and "(name: [/b][red])" in shown
    (folder / "broken.nii.gz").write_bytes(b"not a nifti [/b]")
    prepared = phanes_in_process("data", "prepare", folder, "--out", folder / "m.parquet", "--skull-strip", "never")
    assert "MarkupError" not in prepared.stderr and "Traceback" not in prepared.stderr, prepared.stderr
    assert "broken.nii.gz" in prepared.stdout + prepared.stderr
    from rich.console import Console

    console = Console(record=True, width=300)
    print_summary(console, Counts(total=1, failed=1), 1.0, folder,
                  [{"id": "[/b]", "stage": "decode", "error_type": "[/i]", "message": "bad [/red] file"}])
    text = console.export_text()
    assert "[/b]" in text and "bad [/red] file" in text


def test_a_screening_warning_is_one_line_of_text_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    """`auto`'s warning for a refused artefact names a bundle path: in a log (not a terminal) it stays one line,
    and brackets in it are text, not markup."""
    reason = "backend onnxruntime refused (/runs/[/b]" + "x" * 200 + "/engines/stage2.onnx: changed since export); " \
        "falling back to the next one"
    ProgressDisplay(Counts(total=1), quiet=False).warn(reason)
    assert capsys.readouterr().err == f"warning: {reason}\n"


# ---------------------------------------------------------------------------------------------------------
# Input quality: an extreme voxel, and images that are not T1-weighted brains
# ---------------------------------------------------------------------------------------------------------


REAL_BRAINS = sorted((DATA / "healthy-t1").glob("*.nii.gz")) + sorted((DATA / "glioma-t1").glob("*/T1.nii.gz"))
PACKAGE_DATA = ROOT / "phanes_cli" / "data"
SHIPPED_BRAINS = [*sorted((PACKAGE_DATA / "healthy_t1").glob("*.nii.gz")),
                  PACKAGE_DATA / "mni152" / "mni152_2009a_t1_1mm.nii.gz"]


def _volume(tmp_path: Path, data: np.ndarray, name: str = "v.nii", affine: np.ndarray | None = None) -> Volume:
    """`data` through a real NIfTI file and the loader (uncompressed: gzip adds nothing these checks look at)."""
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(tmp_path / name))
    return load_volume(tmp_path / name)


@pytest.mark.skipif(not REAL_BRAINS, reason="real brains in ../shared/data are absent")
def test_real_t1_brains_pass_and_their_inversions_fail_the_t1_check(tmp_path: Path) -> None:
    """No real brain is flagged (the false-positive rate docs/quality_checks.md quotes); each inverted one is."""
    for path in REAL_BRAINS:
        volume = load_volume(path)
        brain = auto_brain_mask(volume.data)
        assert "not_t1_brain" not in check_volume(volume, brain), path
        inverted = np.where(brain, float(volume.data[brain].max()) - volume.data, 0.0)
        inv = load_volume(_write_like(tmp_path, volume, inverted))
        assert "not_t1_brain" in check_volume(inv, brain), path


def test_shipped_t1_brains_pass_whatever_their_offset_and_scale(tmp_path: Path) -> None:
    """The packaged real brains (no ../shared needed) are T1 brains, also z-scored (negative values)."""
    for path in SHIPPED_BRAINS:
        volume = load_volume(path)
        brain = auto_brain_mask(volume.data)
        assert "not_t1_brain" not in check_volume(volume, brain), path
    inner = volume.data[brain]  # the last: MNI152
    scored = np.where(brain, (volume.data - inner.mean()) / inner.std(), 0.0)
    assert "not_t1_brain" not in check_volume(load_volume(_write_like(tmp_path, volume, scored)), brain)


def _write_like(tmp_path: Path, volume: object, data: np.ndarray) -> Path:
    path = tmp_path / "like.nii"  # uncompressed, as in `_volume`
    nib.save(nib.Nifti1Image(data.astype(np.float32), volume.affine), str(path))  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def label_map() -> object:
    from phanes_cli.synth.label_maps import label_map_names, load_label_map

    return load_label_map(label_map_names()[4])  # the one with the widest CSF spaces (hardest FLAIR)


def test_other_contrasts_of_an_individual_brain_fail_and_its_t1_passes(label_map: object, tmp_path: Path) -> None:
    """One shipped label map drawn as T1 (SynthSeg's model, scanner effects), T2, FLAIR, proton density and CT:
    only the T1 passes, with the brain mask supplied as a file as `phanes screen --brain-mask` gives it."""
    from tests._not_t1 import CONTRASTS, other_contrast, t1_subject

    rng = np.random.default_rng(3)
    affine = label_map.affine  # type: ignore[attr-defined]
    image, brain = t1_subject(label_map, rng)  # type: ignore[arg-type]
    assert check_volume(_volume(tmp_path, image, affine=affine), brain, "file") == []
    for contrast in CONTRASTS:
        image, brain = other_contrast(label_map, contrast, rng)  # type: ignore[arg-type]
        assert "not_t1_brain" in check_volume(_volume(tmp_path, image, affine=affine), brain, "file"), contrast


def test_a_ct_head_through_the_automatic_mask_is_not_a_t1_brain(label_map: object, tmp_path: Path) -> None:
    """Hounsfield units (air -1000, bone 1000, brain 30-40): the threshold mask takes skull and brain."""
    from tests._not_t1 import ct_head

    head, _ = ct_head(label_map, np.random.default_rng(4))  # type: ignore[arg-type]
    volume = _volume(tmp_path, head, affine=label_map.affine)  # type: ignore[attr-defined]
    assert "not_t1_brain" in check_volume(volume, auto_brain_mask(volume.data), "threshold")


def test_phantoms_are_flagged(tmp_path: Path) -> None:
    """Balls (uniform, graded, textured, shelled) and brain-sized ellipsoids (textured, shelled): each is flagged,
    a noise-only ball as noise, the others as not T1 brains (a warning: they are still screened)."""
    from tests._not_t1 import phantoms

    for name, image, mask in phantoms(np.random.default_rng(5)):
        flags = check_volume(_volume(tmp_path, image), mask, "file")
        expected = "intensity_noise" if name == "ball, uniform" else "not_t1_brain"
        assert expected in flags and not set(flags) & FATAL, (name, flags)


@pytest.mark.skipif(not REAL_BRAINS, reason="real brains in ../shared/data are absent")
def test_one_huge_voxel_in_a_clean_brain_is_not_noise(tmp_path: Path) -> None:
    volume = load_volume(REAL_BRAINS[0])
    brain = auto_brain_mask(volume.data)
    data = volume.data.copy()
    centre = tuple(int(c) for c in np.argwhere(brain).mean(0))
    data[centre] = 1e30
    flags = check_volume(load_volume(_write_like(tmp_path, volume, data)), brain)
    assert "intensity_noise" not in flags and "not_t1_brain" not in flags, flags


# ---------------------------------------------------------------------------------------------------------
# SIGTERM while the driver waits inside Ray
# ---------------------------------------------------------------------------------------------------------

SIGTERM_DRIVER = """
import sys, time, ray, typer
from phanes_cli.cli import _friendly
from phanes_cli.errors import stop_on_sigterm

@_friendly
def main() -> None:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    stop_on_sigterm()
    try:
        @ray.remote
        def sleep() -> None:
            time.sleep(120)
        ref = sleep.remote()
        print("READY", flush=True)
        ray.get(ref)  # SIGTERM arrives here: Ray turns the handler's exception into a plain KeyboardInterrupt
    finally:
        ray.shutdown()

try:
    main()
except typer.Exit as exc:  # what the Typer app does with it
    sys.exit(exc.exit_code)
"""


def test_sigterm_inside_a_ray_wait_exits_143_terminated(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DRIVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", proc.communicate()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert "terminated" in out + err and "interrupted" not in out + err
