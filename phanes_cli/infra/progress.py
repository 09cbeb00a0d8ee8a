"""Progress for every long command: a rich bar on a terminal, plain periodic lines everywhere else.

Under a batch scheduler (SLURM, a CI log, `> file`) a live bar prints nothing until the end, so a user
sees nothing for an hour; there, each task prints one plain line (`what: done/total, rate, ETA, info`)
when it starts, every `PHANES_PROGRESS_SECONDS` (default 30 s) and when it completes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

DEFAULT_SECONDS = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("PHANES_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


class LoggedProgress(Progress):
    """A rich Progress that also writes plain lines to stderr when its console is not a terminal."""

    def __init__(self, *columns: str | ProgressColumn, every: float | None = None, **kwargs: Any) -> None:
        super().__init__(*(columns or self.get_default_columns()), **kwargs)
        self._every = _interval() if every is None else every
        self._logged: dict[TaskID, float] = {}
        self._initial: dict[TaskID, float] = {}  # units done before the task started (a resume's skipped volumes)
        self._finished: set[TaskID] = set()
        self._plain = not self.console.is_terminal and not self.disable
        self._printed: dict[TaskID, str] = {}
        if self._plain:  # the plain lines replace rich's bar, which a log would get once, at the end, cut at 80 columns
            self.disable = True

    @classmethod
    def get_default_columns(cls) -> tuple[ProgressColumn, ...]:
        """rich's default columns, with the description shown as text: it names files, whose '[/b]' is no markup."""
        return (TextColumn("{task.description}", markup=False), *Progress.get_default_columns()[1:])

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._initial[task_id] = self._tasks[task_id].completed
        self._log(task_id, force=True)
        return task_id

    def update(self, task_id: TaskID, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID, force: bool = False) -> None:
        if not self._plain:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        if done and task_id in self._finished:  # the end is printed once, even if fields change afterwards
            return
        self._finished.discard(task_id)  # a task whose total grew runs again
        last = self._logged.get(task_id)
        if not (force or done or last is None or now - last >= self._every):
            return
        self._logged[task_id] = now
        if done:
            self._finished.add(task_id)
        self._print(task_id)

    def _print(self, task_id: TaskID) -> None:
        self._printed[task_id] = self._line(task_id)
        print(self._printed[task_id], file=sys.stderr, flush=True)

    def stop(self) -> None:
        """In a log, each task's last state once more where it changed since its last line: a summary set after the
        end (training's best validation loss) or where an interrupted task stood."""
        for task_id in self._printed:
            if self._line(task_id) != self._printed[task_id]:
                self._print(task_id)
        super().stop()

    def _line(self, task_id: TaskID) -> str:
        """`what: done/total, rate, elapsed, ETA info`. The rate is the mean since the task started: rich's own
        speed looks at the last few updates, so two volumes committed a millisecond apart read as 1000/s."""
        task = self._tasks[task_id]
        elapsed = (task.finished_time if task.finished else task.elapsed) or 0.0  # a finished task's clock stops
        speed = (task.completed - self._initial.get(task_id, 0.0)) / elapsed if elapsed > 0 else 0.0
        total = "?" if task.total is None else f"{task.total:g}"
        rate = f", {speed:.3g}/s" if speed > 0 else ""
        eta = (task.total - task.completed) / speed if speed > 0 and task.total is not None else None
        info = task.fields.get("info", "")
        return (f"{task.description}: {task.completed:g}/{total}{rate}, elapsed {_clock(elapsed)}, "
                f"ETA {_clock(eta)}{' ' + str(info) if info else ''}")


def make_progress(enabled: bool = True, every: float | None = None) -> LoggedProgress:
    """Bars with description, count, a free `info` field (losses) and timing, on stderr."""
    return LoggedProgress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), disable=not enabled, every=every)


def format_losses(values: dict[str, float], keys: tuple[str, ...]) -> str:
    """'name=value' pairs of the chosen keys, for the `info` field."""
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
