"""Consoles for tables: rich cuts a table to 80 columns when the output is not a terminal (a log file, a pipe),
so there the width is wide enough for any row instead; a terminal keeps its own width."""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 240  # columns of a table printed to a file or pipe (rows never wrap or truncate below that)


def table_console(stderr: bool = False) -> Console:
    """A Console for tables: the terminal's width on a TTY, $COLUMNS if set, else LOG_WIDTH."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=LOG_WIDTH)
