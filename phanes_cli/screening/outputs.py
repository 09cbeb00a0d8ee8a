"""Where a screening run puts things, and the commit protocol that makes resume exact.

Layout of OUT:
    maps/<id>_anomaly.nii.gz, maps/<id>_mask.nii.gz, maps/<id>_pseudohealthy.nii.gz
    parts/volumes/<id>.parquet   one row, written when the volume is committed
    parts/lesions/<id>.parquet   its lesions (possibly zero rows)
    parts/failures/<id>.parquet  one row when the volume failed
    parts/done/<id>.json         the commit marker, written last
    volumes.parquet, lesions.parquet, failures.parquet   consolidated, sorted by id
    run.json                     the run manifest

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phanes_cli.atomic import atomic_path, write_json, write_parquet

OUTPUT_KINDS = ("anomaly", "mask", "pseudohealthy")
_LIST_I = pa.list_(pa.int64())
_LIST_F = pa.list_(pa.float64())

VOLUME_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("input_path", pa.string()),
    pa.field("status", pa.string()),  # "ok" or "failed" (details in failures.parquet)
    pa.field("shape", _LIST_I),  # in the input file's voxel order
    pa.field("voxel_size_mm", _LIST_F),  # in the input file's voxel order
    pa.field("brain_volume_ml", pa.float64()),
    pa.field("lesion_burden_ml", pa.float64()),
    pa.field("lesion_count", pa.int64()),
    pa.field("largest_lesion_ml", pa.float64()),
    pa.field("max_anomaly", pa.float64()),  # max of s(x) in the brain
    pa.field("mean_anomaly", pa.float64()),  # mean of s(x) over brain voxels
    pa.field("slices_processed", pa.int64()),
    pa.field("backend", pa.string()),
    pa.field("bundle_hash", pa.string()),
    pa.field("runtime_s", pa.float64()),  # decode_s + inference_s + write_s
    pa.field("decode_s", pa.float64()),
    pa.field("inference_s", pa.float64()),
    pa.field("write_s", pa.float64()),
    pa.field("decode_node", pa.string()),  # IP of the Ray node that ran each stage
    pa.field("inference_node", pa.string()),
    pa.field("write_node", pa.string()),
])

LESION_SCHEMA = pa.schema([
    pa.field("volume_id", pa.string()),
    pa.field("lesion_index", pa.int64()),  # 1 = largest
    pa.field("volume_ml", pa.float64()),
    pa.field("voxel_count", pa.int64()),
    pa.field("centroid_voxel", _LIST_F),  # input file voxel order (i, j, k)
    pa.field("centroid_world_mm", _LIST_F),  # through the input affine
    pa.field("bbox_min", _LIST_I),  # inclusive, input file voxel order
    pa.field("bbox_max", _LIST_I),
    pa.field("mean_score", pa.float64()),
    pa.field("max_score", pa.float64()),
    pa.field("axial_axis", pa.int64()),  # the file axis running inferior-superior
    pa.field("slice_min", pa.int64()),  # along axial_axis, file voxel indices
    pa.field("slice_max", pa.int64()),
])

FAILURE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("stage", pa.string()),  # input, decode, inference, write
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
    pa.field("retry_on_resume", pa.bool_()),
    pa.field("input_size", pa.int64()),
    pa.field("input_mtime_ns", pa.int64()),
    pa.field("bundle_hash", pa.string()),
])

_TABLES = {"volumes": VOLUME_SCHEMA, "lesions": LESION_SCHEMA, "failures": FAILURE_SCHEMA}


def input_signature(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an input file, or (None, None) when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None, None
    return int(stat.st_size), int(stat.st_mtime_ns)


def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema` (missing keys are nulls, so empty tables keep their types)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


@dataclass(frozen=True)
class Failure:
    """Why a volume failed, at which stage; `retry_on_resume` is False for errors of the input file itself."""

    stage: str
    error_type: str
    message: str
    retry_on_resume: bool = True


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside OUT; every writer and reader of a run goes through here."""

    root: Path

    @property
    def maps(self) -> Path:
        return self.root / "maps"

    def part(self, table: str, vid: str) -> Path:
        return self.root / "parts" / table / f"{vid}.parquet"

    def done_marker(self, vid: str) -> Path:
        return self.root / "parts" / "done" / f"{vid}.json"

    def map_path(self, vid: str, kind: str) -> Path:
        return self.maps / f"{vid}_{kind}.nii.gz"

    def table(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    @property
    def run_manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".phanes-screen.lock"

    def ensure(self) -> None:
        for sub in ("maps", "parts/volumes", "parts/lesions", "parts/failures", "parts/done"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def clear(self, vid: str) -> None:
        """Remove every output of one id (for --overwrite and before a failure is recorded)."""
        paths = [self.map_path(vid, k) for k in OUTPUT_KINDS]
        paths += [self.done_marker(vid), *(self.part(t, vid) for t in _TABLES)]
        for path in paths:
            path.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Delete temp files a killed run left behind (only safe while holding the run lock)."""
        for folder in (self.maps, *(self.root / "parts" / t for t in (*_TABLES, "done"))):
            if folder.is_dir():
                for path in folder.glob(".tmp-*"):
                    path.unlink(missing_ok=True)


def commit_volume(layout: OutputLayout, vid: str, volume_row: dict[str, Any], lesion_rows: list[dict[str, Any]],
                  marker: dict[str, Any]) -> None:
    """Write a volume's rows and then its done marker (maps must already be written)."""
    write_parquet(layout.part("lesions", vid), table_from_rows(lesion_rows, LESION_SCHEMA))
    write_parquet(layout.part("volumes", vid), table_from_rows([volume_row], VOLUME_SCHEMA))
    write_json(layout.done_marker(vid), marker)
    layout.part("failures", vid).unlink(missing_ok=True)


def record_failure(layout: OutputLayout, vid: str, row: dict[str, Any]) -> None:
    """Replace any previous output of `vid` by one failure row (a failed volume leaves no maps)."""
    layout.clear(vid)
    write_parquet(layout.part("failures", vid), table_from_rows([row], FAILURE_SCHEMA))


def read_marker(layout: OutputLayout, vid: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.done_marker(vid).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(layout: OutputLayout, vid: str, image: Path, bundle_hash: str, outputs: Iterable[str]) -> bool:
    """True when `vid` was committed for this very input file and bundle with every requested output."""
    marker = read_marker(layout, vid)
    if marker is None or marker.get("bundle_hash") != bundle_hash or marker.get("input_path") != str(image):
        return False
    if list(input_signature(image)) != marker.get("input_signature"):
        return False
    if not set(outputs) <= set(marker.get("outputs", [])):
        return False
    files = [layout.map_path(vid, k) for k in outputs] + [layout.part("volumes", vid), layout.part("lesions", vid)]
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


def _ids_with(folder: Path, suffix: str) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


def _stream(tables: Iterator[pa.Table], schema: pa.Schema, target: Path, group_rows: int = 4096) -> int:
    """Concatenate small tables into one Parquet file, row group by row group, with bounded memory."""
    written = 0
    with atomic_path(target) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: list[pa.Table] = []
            rows = 0
            for table in tables:
                table = table.select(schema.names).cast(schema)
                batch.append(table)
                rows += table.num_rows
                if rows >= group_rows:
                    writer.write_table(pa.concat_tables(batch))
                    written, batch, rows = written + rows, [], 0
            if batch:
                writer.write_table(pa.concat_tables(batch))
                written += rows
            if written == 0:
                writer.write_table(schema.empty_table())
    return written


def consolidate(layout: OutputLayout) -> dict[str, int]:
    """Rebuild volumes/lesions/failures.parquet from the committed parts; deterministic order by id.

    Committed volumes come from their parts; a failed volume (failure part, no marker) appears in
    failures.parquet and as a 'failed' row in volumes.parquet. Idempotent: run it as often as you like.
    """
    parts = layout.root / "parts"
    done = _ids_with(parts / "done", ".json")
    done_set = set(done)
    failed = [v for v in _ids_with(parts / "failures", ".parquet") if v not in done_set]
    failure_rows = []
    for vid in failed:
        failure_rows.extend(pq.read_table(layout.part("failures", vid)).to_pylist())
    failed_volume_rows = {r["id"]: {"id": r["id"], "input_path": r["path"], "status": "failed",
                                    "bundle_hash": r["bundle_hash"]} for r in failure_rows}

    def volume_tables() -> Iterator[pa.Table]:
        for vid in sorted(done_set | set(failed_volume_rows)):
            if vid in done_set:
                yield pq.read_table(layout.part("volumes", vid))
            else:
                yield table_from_rows([failed_volume_rows[vid]], VOLUME_SCHEMA)

    n_volumes = _stream(volume_tables(), VOLUME_SCHEMA, layout.table("volumes"))
    n_lesions = _stream((pq.read_table(layout.part("lesions", v)) for v in done), LESION_SCHEMA, layout.table("lesions"))
    write_parquet(layout.table("failures"), table_from_rows(sorted(failure_rows, key=lambda r: r["id"]), FAILURE_SCHEMA))
    return {"volumes": n_volumes, "lesions": n_lesions, "failures": len(failure_rows), "done": len(done)}

