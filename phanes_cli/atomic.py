"""Atomic file writes: a file either appears complete under its final name or not at all.

Every writer in phanes goes through here, so an interrupted run never leaves a half file that looks done.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temporary name keeps the target's suffixes (nibabel picks the format from them) and starts
    with '.tmp-' so listings and resume logic ignore it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name.split('.')[0]}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, payload: Any) -> Path:
    return write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(target: str | Path, table: pa.Table) -> Path:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return Path(target)
