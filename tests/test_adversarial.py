"""Hostile inputs and faults (issue 9): each case is built on disk and must end as a clear error or flag.

Every case asserts its outcome: a PhanesError subclass whose one-line message names the file or key and
the problem, a quality flag (fatal: the volume fails; warning: a `qc_flags` entry), or an unchanged file.
Sections follow the part of phanes that meets the input; owners of other parts add their sections below
(screening, data prepare, evaluate, train). Finer unit checks live in each module's own test file:
test_volume_io.py (geometry, corrupt files), test_quality.py (limits on real data), test_atomic.py (umask).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from phanes_cli.backends import PhanesNetworks
from phanes_cli.bundle import INDEX_FILE, load_bundle, save_bundle, write_calibration
from phanes_cli.config import load_config
from phanes_cli.errors import BundleError, ConfigError, InputError
from phanes_cli.pipeline import Calibration
from phanes_cli.preprocess import auto_brain_mask
from phanes_cli.quality import FATAL, check_volume
from phanes_cli.volume_io import load_volume
from tests._tiny_cohort import tiny_config
from tests.conftest import blob_volume

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
    probe = ("import sys\nfrom phanes_cli.volume_io import load_volume\ntry:\n    load_volume(sys.argv[1])\n"
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
from phanes_cli.bundle import load_bundle, write_calibration
from phanes_cli.pipeline import Calibration
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
