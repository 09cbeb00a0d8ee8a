"""The commit protocol that makes resume exact.

A volume counts as done only when its marker exists, records the same bundle hash and input file
(path, size, mtime) and lists every requested output file, and those files exist. Every file is
written atomically (temp name + rename), maps first, then lesion rows, volume row, marker; so a run
killed at any moment leaves either a committed volume or one that the next run redoes from scratch.
The part folders can be read as datasets while a run is going (`pandas.read_parquet("OUT/parts/volumes")`):
temporary files start with '.', which readers skip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.screening.layout import OutputLayout
from phanes_cli.screening.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    VOLUME_SCHEMA,
    table_from_rows,
    with_extra_columns,
)


def input_signature(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an input file, or (None, None) when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None, None
    return int(stat.st_size), int(stat.st_mtime_ns)

@dataclass(frozen=True)
class Failure:
    """Why a volume failed, at which stage; `retry_on_resume` is False for errors of the input file itself."""

    stage: str
    error_type: str
    message: str
    retry_on_resume: bool = True

def commit_volume(layout: OutputLayout, vid: str, volume_row: dict[str, Any], lesion_rows: list[dict[str, Any]],
                  marker: dict[str, Any]) -> None:
    """Write a volume's rows and then its done marker (maps must already be written)."""
    write_parquet(layout.part("lesions", vid), table_from_rows(lesion_rows, LESION_SCHEMA))
    volume_schema = with_extra_columns(VOLUME_SCHEMA, [volume_row])  # plus the input's manifest columns
    write_parquet(layout.part("volumes", vid), table_from_rows([volume_row], volume_schema))
    write_json(layout.done_marker(vid), marker)
    layout.part("failures", vid).unlink(missing_ok=True)

def record_failure(layout: OutputLayout, vid: str, row: dict[str, Any]) -> None:
    """Replace any previous output of `vid` by one failure row (a failed volume leaves no maps).

    Keys beyond FAILURE_SCHEMA are the input's manifest columns (`manifest_columns`), typed.
    """
    layout.clear(vid)
    write_parquet(layout.part("failures", vid), table_from_rows([row], with_extra_columns(FAILURE_SCHEMA, [row])))

def read_marker(layout: OutputLayout, vid: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.done_marker(vid).read_text())
    except (OSError, json.JSONDecodeError):
        return None

def is_done(layout: OutputLayout, vid: str, image: Path, bundle_hash: str, outputs: Iterable[str],
            min_lesion_ml: float = 0.0) -> bool:
    """True when `vid` was committed for this input file, bundle and minimum lesion size with every requested output."""
    marker = read_marker(layout, vid)
    if marker is None or marker.get("bundle_hash") != bundle_hash or marker.get("input_path") != str(image):
        return False
    if marker.get("min_lesion_ml", 0.0) != min_lesion_ml:
        return False
    if list(input_signature(image)) != marker.get("input_signature"):
        return False
    if not set(outputs) <= set(marker.get("outputs", [])):
        return False
    files = [layout.map_path(vid, k) for k in outputs] + [layout.part("volumes", vid), layout.part("lesions", vid)]
    files += layout.brain_mask_files(vid)
    return all(p.is_file() for p in files)

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
