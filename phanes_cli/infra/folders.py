"""Where phanes may write: never into a folder or over a file it did not make, never outside its output.

`check_id` is the one rule for an id that names files (from the command line, a volume list, or read
back from a run's tables, which may come from anyone); `inside` checks that a path resolves, links
followed, within the folder it belongs to.

A command's output folder must be new, empty, or hold that command's own earlier output (named by a
marker file the command always writes first: `screen` its lock file, `stats` its stats.json). So a raw
dataset, an existing BIDS dataset, the input folder or a screening run given as `stats --out` is refused
before anything is written, and `screen DIR --out DIR` never takes its own maps for subjects.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from phanes_cli.errors import InputError


def check_id(vid: object, source: object = "id") -> str:
    """`vid` when it can name files: a non-empty string, not '.' or '..', without '/', '\\', control characters
    (NUL, newline...), line or paragraph separators, or invisible format characters (bidirectional overrides,
    zero-width marks).

    The one rule for every id, from the command line, a volume list or a run's own tables (a run folder
    received from someone else may hold any text there); `source` names where the id came from. Format
    characters are refused because a right-to-left override makes a file name read differently from what it is.
    """
    if not isinstance(vid, str) or vid in ("", ".", "..") or any(c in vid for c in "/\\"):
        raise InputError(str(source), f"id {str(vid)[:200]!r} cannot be used as a file name "
                                      "(empty, '.', '..', or holds '/' or '\\')")
    hidden = next((c for c in vid if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if hidden is not None:
        raise InputError(str(source), f"id {vid[:200]!r} cannot be used as a file name: it holds the control, "
                                      f"line-break or invisible formatting character U+{ord(hidden):04X}")
    return vid


def inside(root: Path, path: Path) -> Path:
    """`path` after checking that it resolves (links followed) inside `root`; an InputError otherwise."""
    real_root = Path(os.path.realpath(root))
    if not Path(os.path.realpath(path)).is_relative_to(real_root):
        raise InputError(path, f"resolves outside {root}; refusing to write there (an id or link leads out)")
    return path


def claim_folder(folder: Path, markers: Iterable[str], what: str) -> Path:
    """Create `folder`, or accept it when it is empty or holds one of `markers`; an InputError otherwise.

    `what` names the command's output in the message (e.g. "a `phanes screen` run"). The folder is
    created (with its parents) only when it is accepted.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "the output folder is a file")
    if folder.is_dir():
        names = set(markers)
        try:
            entries = [p.name for p in folder.iterdir()]
        except OSError as exc:
            raise InputError(folder, f"cannot list the output folder ({exc.strerror})") from exc
        if entries and not names & set(entries):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise InputError(folder, f"the output folder holds files that are not {what} ({shown}); phanes only "
                                     "writes into a new or empty folder or one of its own outputs: choose another")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
