"""Atomic file writes: a file either appears complete under its final name or not at all.

Every writer in phanes goes through here, so an interrupted run never leaves a half file that looks done.
Files get the mode an ordinary `open()` would give them (0666 less the user's umask), not mkstemp's 0600,
so a shared cohort's results stay readable by the group when the umask allows it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _umask_at_import() -> int:
    """The process umask without a set-and-restore race: /proc first, os.umask only as a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # imports run single-threaded, so the brief change cannot race a writer
    os.umask(mask)
    return mask


_UMASK = _umask_at_import()
FILE_MODE = 0o666 & ~_UMASK


def _temp_name(target: Path) -> Path:
    """A fresh '.tmp-...' name in `target`'s folder (listings and resume logic ignore it), not yet created.

    It keeps the target's last two suffixes (nibabel picks the format from them); prefix and suffix are capped, so a
    target name near the 255-byte limit still has a temp. Missing folders are created with the umask's mode.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:])[-24:]
    return target.parent / f".tmp-{target.name.split('.')[0][:64]}-{secrets.token_hex(6)}{suffix}"


def _create(tmp: Path) -> None:
    """Create `tmp` empty, private until sealed, failing if the name is taken (O_EXCL, like mkstemp)."""
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


@contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    """An empty temporary file beside `target`, removed on the way out unless the block renamed it.

    The name is bound before the file exists, so an interrupt (Ctrl-C, SIGTERM) that lands anywhere after that,
    even while the file is being created, still finds it to remove.
    """
    tmp = _temp_name(target)
    try:
        _create(tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _seal(tmp: Path) -> None:
    """Give a finished temporary file its final mode and flush it to disk before it is renamed."""
    with open(tmp, "rb+") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    with _temp_beside(target) as tmp:
        yield tmp
        _seal(tmp)
        os.replace(tmp, target)


def stage_bytes(target: str | Path, data: bytes) -> Path:
    """Write `data` to a sealed temporary file beside `target` and return it, for a commit of several files.

    The caller renames it onto `target` (os.replace) once every file of the commit is staged, and removes
    it if the commit is abandoned.
    """
    tmp = _temp_name(Path(target))
    try:
        _create(tmp)
        tmp.write_bytes(data)
        _seal(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def json_bytes(payload: Any) -> bytes:
    """The one JSON layout of every file phanes writes: sorted keys, indented, newline-terminated."""
    return (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def write_json(target: str | Path, payload: Any) -> Path:
    return write_bytes(target, json_bytes(payload))


def write_parquet(target: str | Path, table: pa.Table) -> Path:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return Path(target)
