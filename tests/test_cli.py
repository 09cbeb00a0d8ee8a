"""The `phanes` command as a user runs it: every command's exit status (0 success, 2 bad input, 3 some volumes
failed, 130 interrupted) and its one-line messages. Each kind of outcome goes through the installed console
script in a subprocess at least once; the other bad-input cases run the same Typer app in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from phanes_cli import __version__
from phanes_cli.cli import app
from phanes_cli.errors import raise_if_interrupted, stop_on_sigterm
from tests._ray import RayCluster
from tests.test_screening import series

PHANES = Path(sys.executable).parent / "phanes"
COMMANDS = (["data", "synth"], ["data", "prepare"], ["train"], ["calibrate"], ["evaluate"], ["screen"])
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def phanes(*args: str | Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `phanes` console script, as a shell would (`env`: extra environment variables)."""
    return subprocess.run([str(PHANES), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **env})


def phanes_in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same Typer app run in this process (no ~5 s of torch + Ray imports per call), as a CompletedProcess.

    For bad-input cases only: the console script itself (exit status, one line, no traceback) keeps a real
    subprocess case in each test. An exception that escapes the app is appended to stderr as its traceback,
    as the console script would print it, so that "no traceback" still means what it says."""
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="phanes")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["phanes", *map(str, args)], result.exit_code, result.stdout, stderr)


# The plain progress lines long commands print when stderr is not a terminal ("what: done/total, ... ETA ...").
PROGRESS_LINE = re.compile(r"^[^:]+: [\d.]+/[\d.?]+(, [\d.e+-]+/s)?, elapsed \d+:\d\d:\d\d, ETA ")


def lines(text: str) -> list[str]:
    """The non-blank lines of an output, without progress lines."""
    return [line for line in text.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def assert_one_error_line(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that names the problem, and no traceback."""
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert lines(run.stdout) == []
    (line,) = lines(run.stderr)
    assert line.startswith("error: ")
    for text in expected:
        assert text in line, line


def write_volume(path: Path, seed: int) -> Path:
    """A small textured ellipsoid, enough for `data prepare` to accept it as an image."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (20, 24, 16)], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    data = (100 + np.random.default_rng(seed).normal(0, 5, inside.shape)) * inside
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


# ---------------------------------------------------------------- exit 0

def test_version_and_help_list_every_command() -> None:
    version = phanes("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"phanes {__version__}")
    top = phanes("--help")
    assert top.returncode == 0, top.stderr
    for name in ("data", "train", "calibrate", "evaluate", "screen"):
        assert name in top.stdout
    for command in COMMANDS:
        run = phanes_in_process(*command, "--help")
        assert run.returncode == 0, run.stderr
        assert f"Usage: phanes {' '.join(command)}" in " ".join(run.stdout.split())


def test_data_prepare_writes_a_manifest_and_exits_0(tmp_path: Path) -> None:
    write_volume(tmp_path / "in" / "a.nii.gz", 0)
    write_volume(tmp_path / "in" / "b" / "c.nii.gz", 1)
    run = phanes_in_process("data", "prepare", tmp_path / "in", "--out", tmp_path / "m.parquet")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    table = pq.read_table(tmp_path / "m.parquet").to_pydict()
    assert sorted(table["id"]) == ["a", "c"]
    assert sorted(Path(p).name for p in table["image"]) == ["a.nii.gz", "c.nii.gz"]


# ---------------------------------------------------------------- exit 2: one line, no traceback

def test_every_command_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no such [dir]" / ("deep" * 30)  # long and with brackets: must stay one literal line
    write_volume(tmp_path / "in" / "a.nii.gz", 0)
    cases = {  # command line -> what its one error line must say
        # (a bad --kind is a usage error now that it is a choice: test_cli_habits.test_fixed_choices...)
        ("data", "synth", "--out", tmp_path / "s", "--val-sources", "nosuch"): ("nosuch", "niimath_adult_T1"),
        ("data", "prepare", missing, "--out", tmp_path / "m.parquet"): (str(missing), "matches no NIfTI"),  # a glob
        ("train", "--config", missing, "--data", tmp_path, "--out", tmp_path / "b"): (str(missing),),
        ("calibrate", "--bundle", missing, "--data", tmp_path): (str(missing),),
        ("evaluate", "--bundle", missing, "--data", tmp_path, "--out", tmp_path / "e"): (str(missing),),
        ("screen", tmp_path / "in", "--bundle", missing, "--out", tmp_path / "o"): (str(missing),),
    }
    console_script = next(args for args in cases if args[0] == "screen")  # one case through the real console script
    runs = [phanes(*args) if args == console_script else phanes_in_process(*args) for args in cases]
    for run, expected in zip(runs, cases.values(), strict=True):
        assert_one_error_line(run, *expected)
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.parquet").exists()


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (["screen", tmp_path, "--bundle", tmp_path, "--out", tmp_path, "--bogus"], ["train"], ["nope"],
                 ["screen", tmp_path, "--bundle", tmp_path, "--out", tmp_path, "--batch-size", "0"]):
        run = phanes(*args) if "--bogus" in args else phanes_in_process(*args)  # one through the console script
        assert run.returncode == 2, (args, run.stderr)
        assert "Traceback" not in run.stderr + run.stdout
        assert len([line for line in lines(run.stderr) if "Error" in line or "error" in line]) == 1, run.stderr


# ---------------------------------------------------------------- exit 3: some volumes failed

@pytest.mark.slow
def test_screen_with_a_corrupt_volume_exits_3_and_keeps_the_good_ones(ray_head: RayCluster, tiny_bundle: Path,
                                                                     tmp_path: Path) -> None:
    bundle = tiny_bundle
    good = series(tmp_path / "cohort", 2)
    corrupt = tmp_path / "cohort" / "s99.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream")
    run = phanes("screen", tmp_path / "cohort", "--bundle", bundle, "--out", tmp_path / "out", "--address",
                 ray_head.address, "--actors", "1", "--batch-size", "8", timeout=600, PHANES_PROGRESS_SECONDS="0")
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    # stderr is a log here: plain progress lines with the counts, no Ray log line (its thread-join notice)
    assert not [line for line in run.stderr.splitlines() if "worker.py" in line or "WARNING" in line], run.stderr
    progress = [line for line in run.stderr.splitlines() if line.startswith("screen: ")]
    assert progress[-1].startswith("screen: 3/3") and progress[-1].endswith("(2 done, 1 failed, 0 skipped)")
    summary = [line for line in run.stderr.splitlines() if line.startswith("screened 3 volume(s)")]
    assert summary and summary[0].endswith(f"-> {tmp_path / 'out'}")  # one line, however long OUT is
    assert any(line.startswith("  failed s99 (decode, InputError): ") and line.endswith('s99.nii.gz")')
               for line in run.stderr.splitlines()), run.stderr
    volumes = pq.read_table(tmp_path / "out" / "volumes.parquet").to_pydict()
    status = dict(zip(volumes["id"], volumes["status"], strict=True))
    assert status == {**{p.name.split(".")[0]: "ok" for p in good}, "s99": "failed"}
    failures = pq.read_table(tmp_path / "out" / "failures.parquet").to_pydict()
    assert failures["id"] == ["s99"]
    for path in good:
        assert (tmp_path / "out" / "maps" / f"{path.name.split('.')[0]}_anomaly.nii.gz").is_file()


def test_screen_whose_actors_cannot_start_exits_2_with_one_line(ray_head: RayCluster, tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    """Garbage --lpips-weights: every inference actor fails to start. One error line naming the file (none
    of Ray's per-retry messages or remote tracebacks), exit 2, the run marked crashed, nothing committed."""
    bundle = tiny_bundle
    series(tmp_path / "cohort", 1)
    weights = tmp_path / "alexnet.pth"
    weights.write_bytes(b"not a weights file")
    run = phanes("screen", tmp_path / "cohort", "--bundle", bundle, "--out", tmp_path / "out", "--address",
                 ray_head.address, "--actors", "1", "--lpips-weights", weights, "--quiet", timeout=600)
    assert_one_error_line(run, "the inference actors could not start", str(weights))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "crashed"
    assert not list((tmp_path / "out").glob("parts/done/*.json"))


# ---------------------------------------------------------------- exit 130: Ctrl-C

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_an_interrupt_whose_exception_is_swallowed_still_counts() -> None:
    """SIGINT handled inside a finaliser: Python prints "Exception ignored" and drops the KeyboardInterrupt, so a run
    would carry on and end "finished". The record `raise_if_interrupted` reads (called by `screen` before it marks
    a run finished, and by its dispatch loop) raises it again; a fresh command starts without it."""

    class Finaliser:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__

    before = signal.getsignal(signal.SIGINT)  # a Ray session started earlier in this worker may have replaced it
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh `phanes` process starts
    stop_on_sigterm(fresh=True)
    try:
        Finaliser()  # deleted at once: the interrupt is raised inside __del__ and dropped
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    finally:
        stop_on_sigterm(fresh=True)
        signal.signal(signal.SIGINT, before)
    raise_if_interrupted()  # nothing recorded any more


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_exits_130_with_one_line_and_keeps_finished_subjects(tmp_path: Path, sig: signal.Signals, code: int,
                                                                    word: str) -> None:
    """Ctrl-C (130) and SIGTERM (143, as a batch scheduler sends) end alike: one line, finished files kept."""
    out = tmp_path / "synth"
    # A terminal delivers Ctrl-C to a process whose SIGINT is at its default; a test run started in the background
    # (nohup, `cmd &` without job control) ignores SIGINT, and the child would inherit that: restore the default.
    proc = subprocess.Popen([str(PHANES), "data", "synth", "--out", str(out), "--healthy", "500", "--lesions", "0",
                             "--voxel-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("images/healthy-*.nii.gz")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr and lines(stdout) == []
    (line,) = lines(stderr)
    assert line.startswith(word)
    written = sorted(out.glob("images/healthy-*.nii.gz"))
    assert 1 <= len(written) < 500
    for path in written:  # every subject written before the interrupt is a whole, readable file
        assert nib.load(str(path)).get_fdata().any()
    assert not list(out.rglob(".tmp-*"))
