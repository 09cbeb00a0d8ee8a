"""The commit protocol that makes resume exact.

A volume counts as done only when its marker exists, names this id, records the same bundle content key
(`Bundle.content_key`: weights, config and calibration; an export re-sealing the index changes nothing)
and input file (path, size, mtime), lists every requested output file, and those files are as committed:
each map of the recorded size, each part file of the recorded sha256 (a file damaged after its commit
makes the volume run again). Every file is
written atomically (temp name + rename), maps first, then lesion rows, volume row, marker; so a run
killed at any moment leaves either a committed volume or one that the next run redoes from scratch.
The part folders can be read as datasets while a run is going (`pandas.read_parquet("OUT/parts/volumes")`):
temporary files start with '.', which readers skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    VOLUME_SCHEMA,
    table_from_rows,
    with_extra_columns,
)


def input_sha256(path: str | Path) -> str:
    """sha256 of an input file, streamed: recorded in volumes.parquet so a later reader (the report) can tell
    that the file at `input_path` is still the one the maps were computed from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_signature(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an input file, or (None, None) when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None, None
    return int(stat.st_size), int(stat.st_mtime_ns)


def _fingerprint(path: Path, digest: bool) -> list[Any]:
    """[size, sha256 or None] of a committed file (sha256 for the small part files only)."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest() if digest else None
    return [path.stat().st_size, sha]

def commit_volume(layout: OutputLayout, vid: str, volume_row: dict[str, Any], lesion_rows: list[dict[str, Any]],
                  marker: dict[str, Any]) -> None:
    """Write a volume's rows and then its done marker (maps must already be written).

    The marker records every committed file's size (and the part files' sha256) under `files`, so a
    file damaged later is noticed by `is_done`.
    """
    write_parquet(layout.part("lesions", vid), table_from_rows(lesion_rows, LESION_SCHEMA))
    volume_schema = with_extra_columns(VOLUME_SCHEMA, [volume_row])  # plus the input's manifest columns
    write_parquet(layout.part("volumes", vid), table_from_rows([volume_row], volume_schema))
    files = {kind: _fingerprint(layout.map_path(vid, kind), False) for kind in marker.get("outputs", [])}
    files.update({table: _fingerprint(layout.part(table, vid), True) for table in ("volumes", "lesions")})
    write_json(layout.done_marker(vid), {**marker, "files": files})
    layout.part("failures", vid).unlink(missing_ok=True)

def record_failure(layout: OutputLayout, vid: str, row: dict[str, Any]) -> None:
    """Replace any previous output of `vid` by one failure row (a failed volume leaves no maps).

    Keys beyond FAILURE_SCHEMA are the input's manifest columns (`manifest_columns`), typed.
    """
    layout.clear(vid)
    write_parquet(layout.part("failures", vid), table_from_rows([row], with_extra_columns(FAILURE_SCHEMA, [row])))

def read_marker(layout: OutputLayout, vid: str) -> dict[str, Any] | None:
    """The done marker of `vid`; an InputError when the marker belongs to another id sharing its file name."""
    try:
        marker = json.loads(layout.done_marker(vid).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict):
        return None
    if marker.get("id", vid) != vid:
        raise InputError(layout.done_marker(vid), f"holds the volume {str(marker.get('id'))[:200]!r}, which shares "
                                                  f"its file name with {vid[:200]!r}; screen that id into another OUT")
    return marker

def _intact(layout: OutputLayout, vid: str, recorded: Any, outputs: Iterable[str]) -> bool:
    """Every file of a committed volume still as the marker recorded it (markers of older runs: exists)."""
    paths = {kind: layout.map_path(vid, kind) for kind in outputs}
    paths.update({table: layout.part(table, vid) for table in ("volumes", "lesions")})
    if not isinstance(recorded, dict):
        return all(p.is_file() for p in paths.values())
    try:
        return all(kind in recorded and _fingerprint(path, recorded[kind][1] is not None) == recorded[kind]
                   for kind, path in paths.items())
    except (OSError, TypeError, IndexError):
        return False

def is_done(layout: OutputLayout, vid: str, image: Path, bundle_key: str, outputs: Iterable[str],
            min_lesion_ml: float = 0.0) -> bool:
    """True when `vid` was committed for this input file, bundle content and minimum lesion size with every
    requested output intact (see the module docstring)."""
    marker = read_marker(layout, vid)
    if marker is None or marker.get("input_path") != str(image):
        return False
    if marker.get("bundle_key") != bundle_key:
        return False
    if marker.get("min_lesion_ml", 0.0) != min_lesion_ml:
        return False
    if list(input_signature(image)) != marker.get("input_signature"):
        return False
    if not set(outputs) <= set(marker.get("outputs", [])):
        return False
    intact = _intact(layout, vid, marker.get("files"), outputs)
    return intact and all(p.is_file() for p in layout.brain_mask_files(vid))


def previous_failure(layout: OutputLayout, vid: str, image: Path, bundle_hash: str) -> dict[str, Any] | None:
    """The recorded failure of `vid` if it should stand (an input error of an unchanged file), else None."""
    path = layout.part("failures", vid)
    if not path.is_file():
        return None
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError):
        return None
    if not rows:
        return None
    row = rows[0]
    size, mtime = input_signature(image)
    unchanged = row.get("path") == str(image) and row.get("input_size") == size and row.get("input_mtime_ns") == mtime
    if row.get("retry_on_resume") or not unchanged or row.get("bundle_hash") != bundle_hash:
        return None
    return row
