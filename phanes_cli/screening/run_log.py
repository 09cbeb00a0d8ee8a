"""What a screening run tells people and machines: live progress, a JSON-lines log, the run manifest.

The progress display (rich, on stderr) shows volumes done/failed, volumes per minute and the ETA; it is
off with `quiet`. The JSON-lines log (one object per line, flushed per line) is for batch schedulers:
events `start`, `volume` (one per finished or failed volume), `end`. The run manifest `OUT/run.json` is
written when the run starts (status "running", with pid and host) and rewritten when it ends ("finished",
"interrupted" or "crashed"; engine.py). Events also include `warning` (a volume's quality flags).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from phanes_cli.infra.atomic import write_json
from phanes_cli.infra.progress import LoggedProgress
from phanes_cli.infra.versions import runtime_versions


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JsonLog:
    """Append-only JSON-lines event log; every line is flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path | None) -> None:
        self._handle: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def event(self, kind: str, **fields: Any) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps({"time": now_iso(), "event": kind, **fields}, default=str) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class Counts:
    """Volume counts of one run; `skipped` were committed by an earlier run."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    def per_minute(self) -> float:
        """Volumes handled by this run (not skipped ones) per minute of wall time."""
        elapsed = time.monotonic() - self.started
        return 60.0 * (self.done + self.failed) / elapsed if elapsed > 0 else 0.0


class ProgressDisplay:
    """A rich progress bar on stderr, or nothing when quiet."""

    def __init__(self, counts: Counts, quiet: bool) -> None:
        self.counts = counts
        self.console = Console(stderr=True, quiet=quiet)
        self._progress: LoggedProgress | None = None
        self._task: Any = None
        if not quiet:
            self._progress = LoggedProgress(
                TextColumn("[bold]screening"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                           "[dim]{task.fields[skipped]} skipped[/]"),
                TextColumn("{task.fields[rate]:.1f} vol/min"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("screen", total=self.counts.total, completed=self.counts.skipped,
                                                 **self._fields())
        return self

    def _fields(self) -> dict[str, Any]:
        c = self.counts
        return {"done": c.done, "failed": c.failed, "skipped": c.skipped, "rate": c.per_minute(),  # the bar's columns
                "info": f"({c.done} done, {c.failed} failed, {c.skipped} skipped)"}  # plain lines (a log) show the rate

    def note(self, message: str) -> None:
        """One plain line of information (as `warn`, without the warning)."""
        self.console.print(escape(message), soft_wrap=True)

    def warn(self, message: str) -> None:
        """One line (also in a log, where rich would break it at 80 columns); the message is text, not markup."""
        self.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    def refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.counts.finished, **self._fields())

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self.refresh()
            self._progress.stop()


def print_summary(console: Console, counts: Counts, seconds: float, out: Path, failures: list[dict[str, Any]]) -> None:
    """One line of counts, then the failures (up to 20) with their stage and reason; each stays one line (soft
    wrap), also in a log file, where rich would break it at 80 columns."""
    style = "green" if counts.failed == 0 else "yellow"
    console.print(f"[{style}]screened {counts.total} volume(s) in {seconds:.1f} s: {counts.done} done, "
                  f"{counts.failed} failed, {counts.skipped} already done[/] -> {escape(str(out))}", soft_wrap=True)
    for row in failures[:20]:  # ids, paths and messages come from data: escaped, '[/b]' in a name is no markup
        console.print(f"  [red]failed[/] {escape(str(row['id']))} ({escape(str(row['stage']))}, "
                      f"{escape(str(row['error_type']))}): {escape(str(row['message']))}", soft_wrap=True)
    if len(failures) > 20:
        console.print(f"  ... and {len(failures) - 20} more in {escape(str(out / 'failures.parquet'))}",
                      soft_wrap=True)


def write_run_manifest(path: Path, payload: dict[str, Any]) -> None:
    """The run manifest: command line, versions, bundle, options, times and counts."""
    write_json(path, {"command": sys.argv, "versions": runtime_versions(), **payload})
