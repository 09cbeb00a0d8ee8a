"""Hostile inputs and faults (issue 9): each case is built on disk and must end as a clear error or flag.

Every case asserts its outcome: a PhanesError subclass whose one-line message names the file or key and
the problem, a quality flag (fatal: the volume fails; warning: a `qc_flags` entry), or an unchanged file.
Sections follow the part of phanes that meets the input; owners of other parts add their sections below
(screening, data prepare, evaluate, train). Finer unit checks live in each module's own test file:
test_volume_io.py (geometry, corrupt files), test_quality.py (limits on real data), test_atomic.py (umask).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.config import load_config
from phanes_cli.core.bundle import INDEX_FILE, load_bundle, save_bundle, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import load_volume
from phanes_cli.errors import BundleError, ConfigError, InputError, PhanesError
from phanes_cli.infra.atomic import write_bytes
from phanes_cli.inputs.discovery import prepare_manifest, resolve_inputs
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.inputs.quality import FATAL, check_volume
from phanes_cli.run_folder.commit import commit_volume
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout, file_stem
from phanes_cli.runtimes.pytorch import PhanesNetworks, load_networks
from phanes_cli.training.data import healthy_rows
from tests._tiny_cohort import tiny_config, write_cohort
from tests.conftest import blob_volume
from tests.test_cli import phanes_in_process

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------------------
# Volume files: unusable files are an InputError naming the problem (never a raw numpy message), not retried
# ---------------------------------------------------------------------------------------------------------


def _nifti(tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(tmp / name))
    return tmp / name


def _patched(tmp: Path, name: str, offset: int, raw: bytes, codes_off: bool = False) -> Path:
    """A valid 10^3 float volume with some header bytes overwritten (NIfTI-1 offsets)."""
    path = _nifti(tmp, name, np.ones((10, 10, 10), np.float32))
    data = bytearray(path.read_bytes())
    data[offset : offset + len(raw)] = raw
    if codes_off:  # qform_code (252) and sform_code (254) = 0: no affine, voxel size from pixdim only
        data[252:256] = np.zeros(2, "<i2").tobytes()
    path.write_bytes(bytes(data))
    return path


_RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])

_I2, _F4 = "<i2", "<f4"
BAD_FILES = {
    "rgb": (lambda t: _nifti(t, "rgb.nii.gz", np.zeros((10, 10, 10), _RGB)), "RGB or vector-valued"),
    "vector_5d": (lambda t: _nifti(t, "vec.nii.gz", np.zeros((10, 10, 10, 1, 3), np.float32)),
                  "5 dimensions .a vector or RGB"),
    "complex": (lambda t: _nifti(t, "cplx.nii.gz", np.ones((10, 10, 10), np.complex64)), "complex-valued"),
    "zero_dimension": (lambda t: _nifti(t, "zero.nii", np.ones((0, 100, 100), np.float32)),
                       r"dimensions \(0, 100, 100\) must all be positive"),
    "negative_dimension": (lambda t: _patched(t, "neg.nii", 42, np.array([-10], _I2).tobytes()),
                           r"dimensions \(-10, 10, 10\) must all be positive"),
    "zero_voxel_no_affine": (lambda t: _patched(t, "zvox.nii", 80, np.zeros(3, _F4).tobytes(), codes_off=True),
                             "voxel size is 0 .* no sform"),
    "nan_voxel_no_affine": (lambda t: _patched(t, "nanvox.nii", 84, np.array([np.nan], _F4).tobytes(), codes_off=True),
                            "voxel size is 0 or undefined .y=nan"),
    "zero_voxel_sform": (lambda t: _patched(t, "zsform.nii", 280, np.zeros(4, _F4).tobytes()),
                         "voxel size of 0 along axis x"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_unusable_volume_file_is_a_named_input_error_that_is_not_retried(case: str, tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        load_volume(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert info.value.retryable is False


# Root reads any file; without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH it obeys permission bits like a user.
_UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


@pytest.mark.skipif(bool(_UNPRIVILEGED) and shutil.which("setpriv") is None,
                    reason="running as root without setpriv to drop file-access privileges")
@pytest.mark.parametrize("locked", ["file", "folder"])
def test_an_unreadable_volume_is_an_access_error_that_is_retried(locked: str, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = _nifti(tmp_path / "sub", "locked.nii.gz", blob_volume())
    target = path if locked == "file" else path.parent
    target.chmod(0)
    probe = ("import sys\nfrom phanes_cli.core.volume_io import load_volume\ntry:\n    load_volume(sys.argv[1])\n"
             "except Exception as exc:\n    print(type(exc).__name__, exc.retryable, exc)\n")
    try:
        done = subprocess.run([*_UNPRIVILEGED, sys.executable, "-c", probe, str(path)],
                              capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        target.chmod(0o755 if locked == "folder" else 0o644)
    assert done.stdout.startswith(f"InputAccessError True {path}: permission denied"), done.stdout + done.stderr
    assert load_volume(path).data.shape == blob_volume().shape  # readable again once the permissions are fixed


# ---------------------------------------------------------------------------------------------------------
# Volume content: files that load but hold nothing to screen (fatal) or a doubtful scan (warning flag)
# ---------------------------------------------------------------------------------------------------------


def _content(tmp: Path, data: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    return _nifti(tmp, "content.nii.gz", data.astype(np.float32), np.diag([*zooms, 1.0]))


BAD_CONTENT = {
    "all_zero": (lambda t: _content(t, np.zeros((40, 48, 36))), "all_zero"),
    "constant": (lambda t: _content(t, np.full((40, 48, 36), 3.0)), "constant"),
    "pure_noise": (lambda t: _content(t, np.random.default_rng(0).random((80, 96, 72))), "intensity_noise"),
    "thick_slices_0.5x0.5x6": (lambda t: _content(t, blob_volume(), (0.5, 0.5, 6.0)), "voxel_too_large"),
    "tiny_brain": (lambda t: _content(t, blob_volume()), "brain_volume_low"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_implausible_content_is_flagged_fatal_or_warned(case: str, tmp_path: Path) -> None:
    make, flag = BAD_CONTENT[case]
    vol = load_volume(make(tmp_path))
    flags = check_volume(vol, auto_brain_mask(vol.data))
    assert flag in flags
    assert (flag in FATAL) == (case in ("all_zero", "constant"))


def test_an_empty_brain_mask_is_fatal(tmp_path: Path) -> None:
    vol = load_volume(_content(tmp_path, blob_volume()))
    assert check_volume(vol, np.zeros(vol.data.shape, bool)) == ["empty_brain_mask"]


# ---------------------------------------------------------------------------------------------------------
# Run configuration (YAML): a wrong value type or range is a ConfigError naming the key, value and what fits
# ---------------------------------------------------------------------------------------------------------

BAD_YAML = {
    "preprocess:\n  image_size: big\n": r"config\.preprocess\.image_size: expected a whole number, got 'big'",
    "train:\n  stage1:\n    lr: fast\n": r"config\.train\.stage1\.lr: expected a number, got 'fast'",
    "mask:\n  mask_percentile: 150\n": r"config\.mask\.mask_percentile: 150.* allowed: \(0, 100\)",
    "preprocess:\n  percentile: -3\n": r"config\.preprocess\.percentile: -3.* allowed: \(0, 100\]",
    "preprocess:\n  image_size: 100\n": r"image_size: 100 .* multiple of 32",
    "train:\n  batch_size: 2.5\n": r"config\.train\.batch_size: expected a whole number, got 2\.5",
    "train:\n  batch_size: true\n": r"config\.train\.batch_size: expected a whole number, got True",
    "ra:\n  channels: [8, 16, x, 64, 128]\n": r"config\.ra\.channels\[2\]: expected a whole number, got 'x'",
    "aot:\n  rates: 4\n": r"config\.aot\.rates: expected a non-empty list, each a whole number",
    "mask:\n  lpips_sigma: .nan\n": r"config\.mask\.lpips_sigma: expected a finite number",
    "preprocess: [1, 2]\n": r"config\.preprocess: expected a mapping",
    "train:\n  stage2:\n    lr: 0\n": r"config\.train\.stage2\.lr: 0.* allowed: > 0",
    "preprocess:\n  slice_mode: all\n": r"slice_mode: 'all' .* 'brain' or 'mid'",
}


@pytest.mark.parametrize("text", sorted(BAD_YAML))
def test_a_wrong_yaml_value_is_a_config_error_naming_key_value_and_range(text: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=BAD_YAML[text]) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_an_exponent_without_a_dot_is_still_a_number(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  stage1:\n    lr: 5e-5\n")  # PyYAML reads this as the string '5e-5'
    assert load_config(path).train.stage1.lr == 5e-5


# ---------------------------------------------------------------------------------------------------------
# Model bundles: tampered calibration or index (re-hashed by the attacker) is refused; calibration commits
# are all-or-nothing
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    nets = PhanesNetworks(tiny_config()).eval()
    path = tmp_path_factory.mktemp("bundle") / "b"
    save_bundle(path, tiny_config(), nets.ra, nets.generator)
    return path


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "b"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _reseal(folder: Path, index: dict) -> None:
    """Tamper as an attacker would: rewrite the index with the hashes of whatever files it lists now."""
    for name in index["files"]:
        path = folder / name
        if path.is_file():
            index["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / INDEX_FILE).write_text(json.dumps(index))


GOOD_CALIBRATION = {"mask_threshold": 0.25, "anomaly_threshold": 0.125, "n_slices": 10, "n_volumes": 2}


@pytest.mark.parametrize(
    ("key", "value"),
    [("mask_threshold", float("nan")), ("anomaly_threshold", float("inf")), ("mask_threshold", -0.5),
     ("anomaly_threshold", 0.0), ("mask_threshold", "0.25"), ("anomaly_threshold", True), ("n_slices", -1),
     ("n_volumes", 2.5), ("mask_threshold", None), ("bogus", 1.0)],
)
def test_a_resealed_invalid_calibration_is_refused_naming_the_key(key: str, value: object, folder: Path) -> None:
    write_calibration(folder, Calibration(**GOOD_CALIBRATION))
    values = {**GOOD_CALIBRATION, key: value}
    if value is None:
        del values[key]
    (folder / "calibration.json").write_text(json.dumps(values))  # json writes NaN / Infinity as Python reads them
    _reseal(folder, json.loads((folder / INDEX_FILE).read_text()))
    with pytest.raises(BundleError, match=key):
        load_bundle(folder)


@pytest.mark.parametrize("entry", ["../../etc/hostname", "/etc/hostname", "engines/../../outside.bin", "a\\..\\x", ""])
def test_index_entries_outside_the_bundle_are_refused(entry: str, folder: Path) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    index["files"][entry] = "0" * 64
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(BundleError, match="index entry"):
        load_bundle(folder, require_calibration=False)


def test_an_index_entry_that_is_a_link_out_of_the_bundle_is_refused(folder: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (folder / "notes.json").symlink_to(secret)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["files"]["notes.json"] = ""
    _reseal(folder, index)  # the hash matches: only the path check can refuse it
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_bundle(folder, require_calibration=False)


def test_a_refused_calibration_leaves_the_bundle_byte_identical(folder: Path) -> None:
    write_calibration(folder, Calibration(**GOOD_CALIBRATION))
    before = _snapshot(folder)
    with pytest.raises(BundleError, match="mask_threshold"):
        write_calibration(folder, Calibration(mask_threshold=float("nan"), anomaly_threshold=0.1))
    assert _snapshot(folder) == before


def test_a_calibration_commit_failing_mid_way_leaves_the_bundle_byte_identical(folder: Path) -> None:
    """A real fault: a file-size limit lets the small calibration.json be staged, then stops the config."""
    write_calibration(folder, Calibration(**GOOD_CALIBRATION))
    before = _snapshot(folder)
    probe = f"""
import resource, signal
from phanes_cli.core.bundle import load_bundle, write_calibration
from phanes_cli.core.calibration import Calibration
bundle = load_bundle({str(folder)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))
try:
    write_calibration({str(folder)!r}, Calibration(mask_threshold=0.5, anomaly_threshold=0.5), config=bundle.config)
except OSError as exc:
    print("failed", exc.errno)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.stdout.strip() == f"failed {errno.EFBIG}", done.stdout + done.stderr
    assert _snapshot(folder) == before



# ---------------------------------------------------------------------------------------------------------
# Screening, data prepare, evaluate, train: sections added by the owners of those commands
# ---------------------------------------------------------------------------------------------------------

PHANES = Path(sys.executable).parent / "phanes"
CLI_ENV = {**ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def _phanes(*args: str | Path, prefix: tuple[str, ...] = (), timeout: float = 300,
            **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, str(PHANES), *map(str, args)], capture_output=True, text=True, env=CLI_ENV,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


def _one_error_line(run: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, no traceback, one line on stderr naming the problem."""
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ")
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture
def calibrated(folder: Path) -> Path:
    write_calibration(folder, Calibration(**GOOD_CALIBRATION))
    return folder


# --- calibrate: the bundle changes only when a calibration is complete ------------------------------------


def _manifest_with_missing_images(tmp: Path) -> Path:
    rows = [ManifestRow(id=f"v{i}", image=tmp / f"gone{i}.nii.gz", split="val", kind="healthy") for i in range(2)]
    return write_manifest(rows, tmp / "missing_images.parquet")


BAD_MANIFESTS = {
    "missing": lambda t: t / "nowhere.parquet",
    "no_columns": lambda t: (t / "cols.csv").write_text("a,b\n1,2\n") and t / "cols.csv",
    "images_missing_mid_way": _manifest_with_missing_images,
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_failed_calibration_leaves_the_bundle_byte_identical(case: str, calibrated: Path, tmp_path: Path) -> None:
    manifest = BAD_MANIFESTS[case](tmp_path)
    before = _snapshot(calibrated)
    with pytest.raises(PhanesError):  # new percentiles: the old code re-saved the bundle before failing
        calibrate(CalibrateOptions(manifest=manifest, bundle=calibrated, device="cpu", progress=False,
                                   mask_percentile=90.0, anomaly_percentile=95.0))
    assert _snapshot(calibrated) == before
    assert load_bundle(calibrated).calibration == Calibration(**GOOD_CALIBRATION)


# --- screening outputs: names of ids that look hidden, temporary or too long --------------------------------

ODD_IDS = [".x", ".tmp-x", "..x", "a" * 300,  # ".." itself is no id: test_integrity.py
           "é" * 130, "tmp-y", "plain"]


def test_output_names_are_never_hidden_temporary_or_too_long_and_rows_survive_reruns(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    for vid in ODD_IDS:
        write_bytes(layout.map_path(vid, "anomaly"), b"map of " + vid.encode())
        commit_volume(layout, vid, {"id": vid, "status": "ok", "lesion_count": 0}, [], {"id": vid})
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != INDEX_FILE]
    assert files and all(not p.name.startswith(".") and len(p.name.encode()) <= 255 for p in files)
    assert len({file_stem(v) for v in ODD_IDS}) == len(ODD_IDS)
    for _ in range(2):  # a rerun starts by deleting temporaries: nothing of these ids may go
        layout.remove_temporaries()
        consolidate(layout)
        assert sorted(pq.read_table(layout.table("volumes"))["id"].to_pylist()) == sorted(ODD_IDS)
    for vid in ODD_IDS:
        assert layout.map_path(vid, "anomaly").read_bytes() == b"map of " + vid.encode()


# --- input discovery: link cycles, OUT inside the inputs, one image under two ids, text numbers -------------


def test_a_folder_with_links_to_itself_and_its_parent_is_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        _nifti(root / ("sub" if i % 2 else ""), f"s{i:02d}.nii.gz", blob_volume((8, 8, 8), i))
    (root / "sub" / "up").symlink_to(root)
    (root / "sub" / "self").symlink_to(root / "sub")
    (root / "again").symlink_to(root / "sub")
    rows = resolve_inputs([str(root)])
    assert sorted(r.image.name for r in rows) == [f"s{i:02d}.nii.gz" for i in range(12)]
    kept, rejected = prepare_manifest([str(root)], tmp_path / "m.parquet")
    assert len(kept) == 12 and not rejected


def test_out_inside_the_input_folder_is_not_screened_as_subjects(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    root.mkdir()
    _nifti(root, "subject.nii.gz", blob_volume((8, 8, 8)))
    out = root / "results"
    (out / "maps").mkdir(parents=True)
    _nifti(out / "maps", "subject_anomaly.nii.gz", blob_volume((8, 8, 8)))
    assert [r.id for r in resolve_inputs([str(root)], exclude=out)] == ["subject"]
    assert [r.id for r in resolve_inputs([str(root / "**" / "*.nii.gz")], exclude=out)] == ["subject"]


def test_one_image_under_two_ids_stays_two_rows_and_text_numbers_are_read(tmp_path: Path) -> None:
    image = _nifti(tmp_path, "scan.nii.gz", blob_volume((8, 8, 8)))
    listing = tmp_path / "list.csv"
    listing.write_text(f"id,image,lesion_ml\nfirst,{image},12.5\nsecond,{image},\n")
    rows = resolve_inputs([str(listing), str(tmp_path)])  # the folder finds the file again: listed already
    assert [(r.id, r.image, r.lesion_ml) for r in rows] == [("first", image, 12.5), ("second", image, None)]
    listing.write_text(f"id,image,lesion_ml\nfirst,{image},twelve\n")
    with pytest.raises(InputError, match="lesion_ml must be a number of mL, got 'twelve'"):
        resolve_inputs([str(listing)])


def test_evaluate_train_and_calibrate_refuse_duplicate_ids(tmp_path: Path) -> None:
    image = _nifti(tmp_path, "scan.nii.gz", blob_volume((8, 8, 8)))
    manifest = tmp_path / "dupes.csv"
    manifest.write_text(f"id,image,split,kind,lesion_ml\na,{image},val,healthy,1\na,{image},val,healthy,2\n")
    with pytest.raises(InputError, match="duplicate ids in manifest: a"):
        read_manifest(manifest)
    with pytest.raises(InputError, match="duplicate ids"):
        healthy_rows(manifest, "val")  # what train and calibrate read
    manifest.write_text(f"id,image,split,kind,lesion_ml\na,{image},val,healthy,2 mL\n")
    with pytest.raises(InputError, match="lesion_ml must be a number"):
        read_manifest(manifest)


def test_data_prepare_rejects_bad_files_one_by_one_and_writes_the_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("rgb", "negative_dimension", "zero_dimension", "complex"):
        BAD_FILES[case][0](folder)
    good = _nifti(folder, "good.nii.gz", blob_volume((8, 8, 8)))
    rows, rejected = prepare_manifest([str(folder)], tmp_path / "m.parquet")
    assert [r.image for r in rows] == [good]
    assert [r.image for r in read_manifest(tmp_path / "m.parquet")] == [good]
    reasons = {Path(r.path).name: r.reason for r in rejected}
    assert set(reasons) == {"rgb.nii.gz", "neg.nii", "zero.nii", "cplx.nii.gz"}
    assert "(0, 100, 100) must all be positive" in reasons["zero.nii"]


# --- screening decode stage: quality gate and what a resumed run retries ------------------------------------


def _decode(path: Path) -> tuple[object, ...]:
    from phanes_cli.screening.tasks import decode_volume

    return decode_volume(ManifestRow(id="v", image=path), tiny_config().preprocess, 10**8, "never")


def test_the_decode_stage_fails_fatal_quality_and_flags_warnings(tmp_path: Path) -> None:
    decoded, _, _ = _decode(_content(tmp_path, np.zeros((40, 48, 36))))
    assert decoded.failure.error_type == "QualityError"  # type: ignore[attr-defined]
    assert decoded.failure.message == "quality check all_zero: every voxel is 0"  # type: ignore[attr-defined]
    assert decoded.failure.retry_on_resume is False  # type: ignore[attr-defined]
    decoded, _, context = _decode(_content(tmp_path, np.random.default_rng(0).random((80, 96, 72))))
    assert decoded.failure is None and "intensity_noise" in decoded.qc_flags  # type: ignore[attr-defined]
    assert context.qc_flags == decoded.qc_flags  # type: ignore[attr-defined]
    decoded, _, _ = _decode(BAD_FILES["rgb"][0](tmp_path))
    assert decoded.failure.retry_on_resume is False  # type: ignore[attr-defined]


@pytest.mark.skipif(bool(_UNPRIVILEGED) and shutil.which("setpriv") is None,
                    reason="running as root without setpriv to drop file-access privileges")
def test_an_unreadable_input_fails_as_retryable_and_decodes_once_readable(tmp_path: Path) -> None:
    path = _nifti(tmp_path, "locked.nii.gz", blob_volume())
    path.chmod(0)
    probe = ("import sys\nfrom tests.test_adversarial import _decode\nf = _decode(__import__('pathlib').Path("
             "sys.argv[1]))[0].failure\nprint(f.error_type, f.retry_on_resume)\n")
    try:
        done = subprocess.run([*_UNPRIVILEGED, sys.executable, "-c", probe, str(path)], capture_output=True,
                              text=True, env=ENV, timeout=300, cwd=ROOT)
    finally:
        path.chmod(0o644)
    assert done.stdout.split() == ["InputAccessError", "True"], done.stdout + done.stderr
    assert _decode(path)[0].failure is None  # type: ignore[attr-defined]


# --- the command line under faults: one line, exit 2 (or 143 on SIGTERM), nothing committed lost ----------


def _cohort(tmp: Path) -> Path:
    (tmp / "in").mkdir()
    _nifti(tmp / "in", "a.nii.gz", blob_volume())
    return tmp / "in"


def _fsize_limit() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))


def test_file_system_faults_are_one_line_errors(calibrated: Path, tmp_path: Path) -> None:
    cohort = _cohort(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "logdir").mkdir()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    screen = ("screen", cohort, "--bundle", calibrated, "--quiet")
    processes = {  # these need a process of their own (fewer capabilities, a file size limit): the console script
        "read_only_out": lambda: _phanes(*screen, "--out", readonly, prefix=tuple(_UNPRIVILEGED)),
        "file_size_limit": lambda: _phanes("data", "prepare", cohort, "--out", tmp_path / "m2.parquet",
                                           preexec_fn=_fsize_limit),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:  # meanwhile the same app runs the other cases in this process
        done = {name: pool.submit(run) for name, run in processes.items()}
        results = {
            "out_is_file": phanes_in_process(*screen, "--out", tmp_path / "file"),
            "log_is_folder": phanes_in_process(*screen, "--out", tmp_path / "o1", "--log-jsonl", tmp_path / "logdir"),
            "log_disk_full": phanes_in_process(*screen, "--out", tmp_path / "o2", "--log-jsonl", "/dev/full"),
            "evaluate_out_is_file": phanes_in_process("evaluate", "--bundle", calibrated, "--data",
                                                      tmp_path / "m.parquet", "--out", tmp_path / "file"),
        }
        results.update({name: future.result() for name, future in done.items()})
    readonly.chmod(0o755)
    _one_error_line(results["out_is_file"], str(tmp_path / "file"))
    _one_error_line(results["log_is_folder"], str(tmp_path / "logdir"), "Is a directory")
    _one_error_line(results["log_disk_full"], "No space left on device")
    assert json.loads((tmp_path / "o2" / "run.json").read_text())["status"] == "crashed"
    if not _UNPRIVILEGED or shutil.which("setpriv"):
        _one_error_line(results["read_only_out"], "Permission denied")
    _one_error_line(results["evaluate_out_is_file"], "--out must be a folder")
    _one_error_line(results["file_size_limit"], "File too large")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_cluster_that_does_not_answer_times_out_naming_it_and_a_stale_run_is_marked(calibrated: Path,
                                                                                      tmp_path: Path) -> None:
    cohort, out = _cohort(tmp_path), tmp_path / "out"
    out.mkdir()
    stale = {"run_id": "old", "status": "running", "pid": 999999, "host": "gone", "started": "2020-01-01"}
    (out / "run.json").write_text(json.dumps(stale))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.9", 0))
        address = f"127.0.0.9:{probe.getsockname()[1]}"
    began = time.monotonic()
    run = _phanes("screen", cohort, "--bundle", calibrated, "--out", out, "--quiet", "--address", address,
                  "--connect-timeout", "5", timeout=240)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    last = [x for x in run.stderr.splitlines() if x.strip()][-1]  # after Ray's own warnings of the attempt
    assert last.startswith(f"error: the Ray cluster at {address} did not answer within 5 s"), run.stderr
    assert time.monotonic() - began < 200
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "crashed" and address in manifest["error"]
    assert manifest["previous_run"] == {**stale, "status": "abandoned", "finished": None}
    with open(out / ".phanes-screen.lock", "a+") as handle:  # the lock was released
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# SIGTERM on a command: tests/test_cli.py (with Ctrl-C); on a screening run: tests/test_screening.py.
    assert not list(out.rglob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------------
# The shipped models and what is made from them (issue 35): no command writes into a shipped bundle (a site
# calibrates a copy: calibrate --out), a cached first-use export is checked against its export's own record
# rather than its re-sealable index, and a bundle's weights of other shapes are named, tensor and shapes
# ---------------------------------------------------------------------------------------------------------


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: a write, addition or removal changes it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def shipped(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny bundle, calibrated, as the one model of a folder of shipped models ($PHANES_MODELS_DIR: the
    installed package's own folder is guarded alike, and a broken guard must not write into it here), with a
    checkpoint beside it that no copy may take."""
    work = Path(shutil.copytree(pristine, tmp_path / "work" / "tiny-shipped"))
    write_calibration(work, Calibration(**GOOD_CALIBRATION))
    target = Path(shutil.copytree(work, tmp_path / "models" / "tiny-shipped"))
    (target / "checkpoints").mkdir()
    (target / "checkpoints" / "last.safetensors").write_bytes(b"not part of the model")
    monkeypatch.setenv("PHANES_MODELS_DIR", str(target.parent))
    monkeypatch.setenv("PHANES_CACHE_DIR", str(tmp_path / "cache"))
    return target


@pytest.fixture(scope="module")
def controls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's healthy controls: the tiny cohort's manifest (its 'val' volumes are what calibrate uses)."""
    return write_cohort(tmp_path_factory.mktemp("controls"))


def _writers(shipped: Path, controls: Path, tmp: Path) -> dict[str, list[str | Path]]:
    """Every command that writes into a bundle, aimed at the shipped one (directly, by default, through a link)."""
    link = tmp / "link-to-shipped"
    link.symlink_to(shipped)
    config = tmp / "tiny.yaml"
    config.write_text(json.dumps(tiny_config().to_dict()))  # JSON is YAML
    return {
        "calibrate --bundle": ["calibrate", "--bundle", shipped, "--data", controls, "--no-tune", "--device", "cpu"],
        "calibrate (default model)": ["calibrate", "--data", controls, "--no-tune", "--device", "cpu"],
        "calibrate through a link": ["calibrate", "--bundle", link, "--data", controls, "--device", "cpu"],
        "export": ["export", "--bundle", shipped, "--cpu-backends", ""],
        "export through a link": ["export", "--bundle", link],
        "bench": ["bench", "--bundle", shipped, "--backends", "torch", "--slices", "2", "--repeats", "1"],
        "train into the models folder": ["train", "--config", config, "--data", controls, "--out",
                                         shipped.parent / "new-model", "--device", "cpu"],
    }


def test_no_command_writes_into_a_shipped_model(shipped: Path, controls: Path, tmp_path: Path) -> None:
    before = _hashes(shipped.parent)
    for name, args in _writers(shipped, controls, tmp_path).items():
        run = phanes_in_process(*args)
        line = _one_error_line(run, "inside the folder of models shipped with phanes", "never writes into")
        assert str(shipped.parent) in line, (name, line)
        if name.startswith("calibrate"):
            assert "pass --out NEW_FOLDER" in line, line
        assert _hashes(shipped.parent) == before, name
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["tiny-shipped"]


def test_no_library_writer_writes_into_a_shipped_model(shipped: Path) -> None:
    """The one rule (`bundle.check_writable`) sits in every writer, so a caller that forgets to ask is refused
    too; the installed package's own folder of models is refused alike, whatever $PHANES_MODELS_DIR says."""
    from phanes_cli.core import bundle as bundle_module

    before = _hashes(shipped.parent)
    nets = PhanesNetworks(tiny_config())
    writes = {
        "write_calibration": lambda: write_calibration(shipped, Calibration(mask_threshold=0.5, anomaly_threshold=0.5)),
        "write_provenance": lambda: bundle_module.write_provenance(shipped, {"edited": True}),
        "seal_index": lambda: bundle_module.seal_index(shipped),
        "save_bundle": lambda: save_bundle(shipped, tiny_config(), nets.ra, nets.generator),
        "save_bundle beside it": lambda: save_bundle(shipped.parent / "other", tiny_config(), nets.ra, nets.generator),
        "copy_bundle into it": lambda: bundle_module.copy_bundle(shipped, shipped.parent / "copy"),
    }
    for name, write in writes.items():
        with pytest.raises(BundleError, match="inside the folder of models shipped with phanes"):
            write()
        assert _hashes(shipped.parent) == before, name
    for folder in (bundle_module.PACKAGE_MODELS / "any", bundle_module.IMPORTED_MODELS / "any"):
        with pytest.raises(BundleError, match="inside the folder of models shipped with phanes"):
            bundle_module.check_writable(folder)


def test_site_calibration_writes_a_calibrated_copy_and_leaves_the_shipped_model(shipped: Path, controls: Path,
                                                                               tmp_path: Path) -> None:
    """issue 31's site calibration: the shipped model calibrated on a site's healthy controls into a new bundle.
    Oracle: the same calibration run in place on a plain copy of the shipped folder."""
    before = _hashes(shipped.parent)
    site = tmp_path / "site-model"
    run = phanes_in_process("calibrate", "--data", controls, "--out", site, "--no-tune", "--device", "cpu",
                            "--backend", "torch")
    assert run.returncode == 0, run.stdout + run.stderr
    assert _hashes(shipped.parent) == before  # byte-identical, checkpoint and all
    listed = json.loads((shipped / INDEX_FILE).read_text())["files"]
    assert sorted(_hashes(site)) == sorted([*listed, INDEX_FILE])  # the model's files only: no checkpoints
    plain = Path(shutil.copytree(shipped, tmp_path / "plain-copy", ignore=shutil.ignore_patterns("checkpoints")))
    expected = calibrate(CalibrateOptions(manifest=controls, bundle=plain, device="cpu", progress=False, tune=False,
                                          backend="torch"))
    copy, original = load_bundle(site), load_bundle(shipped)
    assert copy.calibration == expected != original.calibration
    assert copy.ra_state.keys() == original.ra_state.keys()
    assert all(torch.equal(copy.ra_state[k], original.ra_state[k]) for k in original.ra_state)
    for out, problem in ((site, "holds files that are not a calibrated copy"), (shipped / "sub", "lies inside")):
        again = phanes_in_process("calibrate", "--data", controls, "--out", out, "--no-tune", "--device", "cpu")
        _one_error_line(again, problem)
    assert _hashes(shipped.parent) == before


def _zero_first_initializer(graph: Path) -> None:
    import onnx

    model = onnx.load(str(graph))
    first = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(first)
    first.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(array), first.name))
    onnx.save(model, str(graph))


def test_a_cached_export_edited_and_resealed_is_exported_again(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack of issue 35: a graph of the first-use export zeroed, its provenance entry and the index made to
    match. The cache is checked against what the export recorded, so it is exported again, not run. (The export
    gates of the cheaper backends are left out here, two plain exports instead of two gated ones: the gates are
    tests/test_gated_backends.py's subject, the gated first use tests/test_shipped_models.py's.)"""
    pytest.importorskip("onnxruntime")
    from phanes_cli.core.bundle import seal_index
    from phanes_cli.runtimes import export, first_use
    from phanes_cli.runtimes.first_use import exported_copy

    monkeypatch.setattr(export, "GATED_BACKENDS", ())
    monkeypatch.setattr(first_use, "GATED_BACKENDS", ())

    reports: list[str] = []
    copy = exported_copy(shipped, report=reports.append)
    graph = copy / "engines" / "stage1.onnx"
    fresh = graph.read_bytes()
    _zero_first_initializer(graph)
    provenance = json.loads((copy / "engines" / "provenance.json").read_text())
    provenance["artefacts"]["stage1.onnx"]["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (copy / "engines" / "provenance.json").write_text(json.dumps(provenance))
    seal_index(copy)
    assert graph.read_bytes() != fresh and load_bundle(copy).hash  # a consistent, re-sealed bundle
    assert exported_copy(shipped, report=reports.append) == copy
    assert len(reports) == 2 and "exporting its ONNX graphs" in reports[1]
    assert graph.read_bytes() == fresh  # the export again: the same bytes as the first one
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 2  # and now used as it is


def test_stage1_weights_of_other_shapes_are_named_tensor_and_shapes(folder: Path, controls: Path,
                                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "ra.safetensors"))
    name = next(k for k, v in weights.items() if v.dim() == 4)
    shape = tuple(weights[name].shape)
    other = (shape[0] + 3, *shape[1:])
    weights[name] = torch.zeros(other)
    save_file(weights, str(folder / "ra.safetensors"))
    _reseal(folder, json.loads((folder / INDEX_FILE).read_text()))
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(tiny_config().to_dict()))
    run = phanes_in_process("train", "--config", config, "--data", controls, "--out", tmp_path / "out",
                            "--stage1-from", folder, "--device", "cpu")
    _one_error_line(run, "ra.safetensors", f"tensor {name!r} has shape {other} in the file, {shape} in the config's")
    with pytest.raises(BundleError, match=rf"tensor '{name}' has shape"):  # the same check where any bundle loads
        load_networks(load_bundle(folder, require_calibration=False))


# ---------------------------------------------------------------------------------------------------------
# What a viewer page embeds, and what a resumed run joins: bounded, and never over the tables' own columns
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(97, 1, 89), (1, 1, 5000), (33, 34, 35), (2, 3000, 2)])
def test_a_case_of_any_shape_is_embedded_within_the_voxel_budget(shape: tuple[int, int, int]) -> None:
    """Thin, one-voxel and odd shapes over a (small) budget: every layer within it, the views' centre on the
    coarse grid, the same world point under the first voxel's block centre, and a note saying so."""
    from phanes_cli.cohort_report.cases import CaseArrays
    from phanes_cli.cohort_report.display import within_budget

    rng = np.random.default_rng(0)
    full = CaseArrays(image=rng.random(shape).astype(np.float32), anomaly=rng.random(shape).astype(np.float32),
                      lesion=rng.random(shape) > 0.99, brain=np.ones(shape, bool), truth=rng.random(shape) > 0.99,
                      pseudo_healthy=None, affine=np.diag([0.5, 0.5, 0.5, 1.0]), zooms=(0.5, 0.5, 0.5),
                      centre=tuple(n - 1 for n in shape), brain_source="test")  # type: ignore[arg-type]
    shown = within_budget(full, budget=1000)
    layers = [shown.image, shown.anomaly, shown.lesion, shown.brain, shown.truth]
    assert all(layer is not None and layer.shape == shown.image.shape and layer.size <= 1000 for layer in layers)
    assert all(0 <= c < n for c, n in zip(shown.centre, shown.image.shape, strict=True))
    factor = shown.zooms[0] / 0.5
    assert np.allclose(shown.affine[:3, 3], 0.5 * (factor - 1) / 2) and "blocks of voxels" in shown.notes[-1]
    assert float(shown.anomaly.max()) == float(full.anomaly.max())  # a hot spot stays as hot
    assert within_budget(full, budget=int(np.prod(shape))) is full  # within the budget: untouched


def test_covariates_joined_on_resume_never_replace_the_tables_own_columns(tmp_path: Path) -> None:
    """Inputs whose columns, edited since the parts were written, are named like the tables' own (status, id,
    lesion_burden_ml): they arrive prefixed, the volume's own values stand."""
    from phanes_cli.run_folder.commit import record_failure

    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    record_failure(layout, "a", {"id": "a", "path": "a.nii.gz", "stage": "decode", "error_type": "InputError",
                                 "message": "bad", "bundle_hash": "h", "site": "old"})
    hostile = {"status": "ok", "id": "b", "lesion_burden_ml": 1e9, "input_status": "x", "site": "new"}
    consolidate(layout, [ManifestRow(id="a", image=tmp_path / "a.nii.gz", extra=hostile)])
    (row,) = pq.read_table(layout.table("volumes")).to_pylist()
    assert (row["id"], row["status"], row["lesion_burden_ml"], row["site"]) == ("a", "failed", None, "new")
    assert (row["input_status"], row["input_input_status"], row["input_id"], row["input_lesion_burden_ml"]) == (
        "x", "ok", "b", 1e9)
