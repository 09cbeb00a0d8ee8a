"""One rich progress display per command: loading, both training stages and calibration share it.

Sharing one display (instead of one per step) keeps bars from fighting over the terminal; a disabled
display accepts the same calls and prints nothing (`progress=False`, tests).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress(enabled: bool = True) -> Progress:
    """Bars with description, count, a free `info` field (losses) and timing, on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def format_losses(values: dict[str, float], keys: tuple[str, ...]) -> str:
    """'name=value' pairs of the chosen keys, for the `info` field."""
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
