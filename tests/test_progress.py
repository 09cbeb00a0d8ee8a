"""Plain progress lines when the output is not a terminal (batch schedulers, log files)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phanes_cli.cli import app
from phanes_cli.infra.progress import make_progress


def test_plain_lines_at_start_periodically_and_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    with make_progress(enabled=True, every=0.0) as bar:  # stderr is captured: not a terminal
        task = bar.add_task("stage 1", total=3, info="")
        for step in range(3):
            bar.update(task, advance=1, info=f"loss={step}")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stage 1:")]
    assert lines[0].startswith("stage 1: 0/3")
    assert any(line.startswith("stage 1: 2/3") and "loss=1" in line for line in lines)
    assert lines[-1].startswith("stage 1: 3/3") and "ETA" in lines[-1] and "loss=2" in lines[-1]


def test_the_logged_rate_is_the_mean_since_the_start_not_the_last_burst(capsys: pytest.CaptureFixture[str]) -> None:
    """Two units finished a moment apart after 0.3 s of work: 2 / elapsed per second (rich's own speed, from
    the last updates only, reads thousands), and the ETA follows from that mean."""
    with make_progress(enabled=True, every=0.0) as bar:
        task = bar.add_task("volumes", total=4, completed=1, info="")  # one done by an earlier run
        time.sleep(0.3)
        bar.advance(task)
        bar.advance(task)
        elapsed = bar.tasks[0].elapsed
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("volumes: 3/4")][-1]
    rate = float(re.search(r", ([0-9.e+]+)/s,", line).group(1))  # type: ignore[union-attr]
    assert elapsed is not None and elapsed >= 0.3 and rate == pytest.approx(2 / elapsed, rel=0.05)
    eta = re.search(r"ETA 0:00:(\d\d)", line)
    assert eta is not None and int(eta.group(1)) == int(elapsed / 2)


def test_a_log_gets_plain_lines_only_and_a_summary_set_after_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    """No rich bar in a log (it came once at the end, cut to 80 columns with '…'); a field set after a task ended
    (training's best validation loss) gets one more line; an unchanged finished task none."""
    with make_progress(enabled=True, every=0.0) as bar:
        steps = bar.add_task("stage 1", total=2, info="")
        other = bar.add_task("loading", total=1, info="3 slices")
        bar.advance(other)
        bar.update(steps, advance=2, info="loss=1")
        bar.update(steps, info="best val 0.5 (max_steps)")
        interrupted = bar.add_task("stage 2", total=5, info="")
        bar.advance(interrupted)
    err = capsys.readouterr().err
    assert "━" not in err and "…" not in err
    lines = err.splitlines()
    assert [x for x in lines if x.startswith("stage 1: 2/2")][-1].endswith("best val 0.5 (max_steps)")
    assert len([x for x in lines if x.startswith("loading: 1/1")]) == 1
    assert lines[-1].startswith("stage 2: 1/5")


def test_no_lines_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    with make_progress(enabled=False, every=0.0) as bar:
        task = bar.add_task("quiet", total=2, info="")
        bar.advance(task)
    assert "quiet" not in capsys.readouterr().err


def test_data_synth_to_a_log_file_prints_progress_lines(tmp_path: Path) -> None:
    """A real `phanes data synth` (the CLI app, in this process) whose stderr is not a terminal prints dated
    lines, not a silent bar."""
    run = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "c"), "--healthy", "2", "--lesions", "0",
                                   "--seed", "0", "--voxel-size", "4"], env={"PHANES_PROGRESS_SECONDS": "0"})
    assert run.exit_code == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if "/2" in line and "ETA" in line]
    assert progress and progress[-1].split(":")[1].strip().startswith("2/2")
