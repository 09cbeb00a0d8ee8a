"""Consolidation: the committed part files of a run become its three tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import BundleError
from phanes_cli.infra.atomic import atomic_path, write_parquet
from phanes_cli.infra.columns import cast_column
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.commit import record_failure
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    TABLES,
    THRESHOLD_COLUMNS,
    VOLUME_SCHEMA,
    extra_fields,
    file_metadata,
    manifest_columns,
    table_from_rows,
    with_extra_columns,
)

PART_READERS = 4  # threads reading part files in `consolidate`

PART_GROUP = 128  # part files read and combined at a time (larger groups only cost memory)

def run_metadata(layout: OutputLayout) -> dict[str, str]:
    """`file_metadata` of a screening run, from the calibration its run.json records (as applied); the thresholds
    are null when run.json is missing or unreadable (the tables are still written)."""
    try:
        bundle = json.loads(layout.run_manifest.read_text()).get("bundle", {})
        thresholds: dict[str, Any] = Calibration.from_dict(bundle.get("calibration"), layout.run_manifest).columns()
    except (OSError, json.JSONDecodeError, AttributeError, BundleError):
        bundle, thresholds = {}, dict.fromkeys(THRESHOLD_COLUMNS)
    return file_metadata(thresholds, bundle.get("hash"))


def _ids_with(folder: Path, suffix: str) -> list[str]:
    """The file stems (`file_stem`) of the committed parts in `folder`; temporaries start with '.'."""
    if not folder.is_dir():
        return []
    names = (p.name for p in folder.iterdir())
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith("."))

def _read_part(path: Path) -> pa.Table | None:
    """A part file, or None when it cannot be read (damaged after its atomic write: disk, another program)."""
    try:
        with pq.ParquetFile(path) as part:
            return part.read()
    except (pa.ArrowInvalid, OSError):
        return None

def _part_groups(layout: OutputLayout, table: str, ids: list[str], pool: ThreadPoolExecutor,
                 damaged: set[str]) -> Iterator[pa.Table]:
    """The part files of `ids`, in that order, PART_GROUP files per table; one empty table when there are none.

    The ids of unreadable files go to `damaged`. A few threads read the files (opening and decoding
    Parquet releases the GIL), and each group is
    combined into contiguous columns before the next is read: thousands of one-row Arrow tables alive at
    once hold tens of MB in Arrow's allocator, a group at a time keeps memory flat.
    """
    if not ids:
        yield TABLES[table].empty_table()
    for start in range(0, len(ids), PART_GROUP):
        group = ids[start:start + PART_GROUP]
        tables = list(pool.map(_read_part, [layout.part(table, vid) for vid in group]))
        damaged.update(vid for vid, t in zip(group, tables, strict=True) if t is None)
        readable = [t for t in tables if t is not None] or [TABLES[table].empty_table()]
        if any(t.schema != readable[0].schema for t in readable):  # parts may disagree (int, float, null)
            schema = extra_fields(TABLES[table], [t.schema for t in readable])
            readable = [_conform(t, schema) for t in readable]
        yield pa.concat_tables(readable).combine_chunks()

def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order and types (columns it lacks are nulls)."""
    present = set(table.column_names)  # a set: `in` the list would make this quadratic in the columns
    columns = [cast_column(table.column(f.name), f.type) if f.name in present
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)

def _extra_schema(schema: pa.Schema, tables: Iterable[pa.Table]) -> pa.Schema:
    """`schema` plus the manifest columns of `tables`, each with one type for all the parts (`extra_fields`)."""
    return extra_fields(schema, [t.schema for t in tables])

def _join_current(table: pa.Table, base: pa.Schema, carried: Mapping[str, dict[str, Any]]) -> pa.Table:
    """`table` whose rows of the ids in `carried` take their manifest columns from `carried` (the inputs as they
    are now), not from their part files; the other rows keep theirs. Sorted by id, each column typed from all
    its values (`extra_fields`)."""
    if not carried:
        return table
    current = pc.is_in(table.column("id"), value_set=pa.array(list(carried), pa.string()))
    kept = table.filter(pc.invert(current))
    own = set(base.names)
    gone = [n for n in kept.column_names if n not in own and kept.column(n).null_count == kept.num_rows]
    kept = kept.drop_columns(gone)  # a column only the re-joined rows had: the inputs no longer hold it
    fresh = table.filter(current).select(base.names)
    rows = [carried[str(vid)] for vid in fresh.column("id").to_pylist()]
    joined = table_from_rows(rows, with_extra_columns(pa.schema([]), rows))
    for field in joined.schema:
        fresh = fresh.append_column(field, joined.column(field.name))
    schema = extra_fields(base, [kept.schema, fresh.schema])
    return pa.concat_tables([_conform(kept, schema), _conform(fresh, schema)]).sort_by("id")


def _write_groups(groups: Iterable[pa.Table], schema: pa.Schema, target: Path) -> int:
    """Write tables into one Parquet file, one row group each; returns the number of rows."""
    written = 0
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for group in groups:
            writer.write_table(_conform(group, schema))
            written += group.num_rows
    return written

def _record_damage(layout: OutputLayout, stem: str) -> None:
    """Replace the outputs of a volume whose part file is unreadable by a failure row saying so.

    The row's id and input come from its done marker (the stem when that is unreadable too); the volume
    is retried on resume, and the run's exit status counts it as failed.
    """
    try:
        marker = json.loads((layout.root / "parts" / "done" / f"{stem}.json").read_text())
        marker = marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):
        marker = {}
    vid = str(marker["id"]) if isinstance(marker.get("id"), str) else stem
    signature = marker.get("input_signature") or [None, None]
    record_failure(layout, vid, {
        "id": vid, "path": marker.get("input_path"), "stage": "write", "error_type": "DamagedOutput",
        "message": "a part file of this volume could not be read after its commit (damaged on disk or by "
                   "another program); the next run screens it again",
        "retry_on_resume": True, "input_size": signature[0], "input_mtime_ns": signature[-1],
        "bundle_hash": marker.get("bundle_hash")})
    layout.done_marker(stem).unlink(missing_ok=True)


def consolidate(layout: OutputLayout, inputs: Sequence[ManifestRow] = ()) -> dict[str, int]:
    """Rebuild volumes/lesions/failures.parquet from the committed parts; deterministic order by id.

    Committed volumes come from their parts; a failed volume (failure part, no marker) appears in
    failures.parquet and as a 'failed' row in volumes.parquet. The volumes table (one row per volume) is
    sorted in memory; lesions stream through, a group of part files at a time. Idempotent: run it as often
    as you like.
    The input's manifest columns become typed columns of volumes and failures (so the schema is per run;
    a column whose parts disagree takes the type that holds them all: int and float make float),
    and every table carries `run_metadata` as Parquet key-value metadata. A part file that cannot be read
    (damaged after it was written) turns its volume into a failure row (`_record_damage`), so the tables
    and the exit status say so and the next run screens it again; `damaged` counts those volumes.
    `inputs`: the run's manifest rows; their volumes take the manifest columns these rows hold now instead
    of the values their part files were written with, so a covariate edited between two runs
    (participants.tsv) reads in the tables as the file says now.
    """
    carried = {row.id: manifest_columns(row.extra) for row in inputs}
    parts = layout.root / "parts"
    done = _ids_with(parts / "done", ".json")
    done_set = set(done)
    failed = [v for v in _ids_with(parts / "failures", ".parquet") if v not in done_set]
    meta, damaged = run_metadata(layout), set[str]()
    with ThreadPoolExecutor(PART_READERS) as pool:
        failure_parts = list(_part_groups(layout, "failures", failed, pool, damaged))
        failure_schema = _extra_schema(FAILURE_SCHEMA, failure_parts)
        failures = pa.concat_tables([_conform(t, failure_schema) for t in failure_parts]).sort_by("id")
        failures = _join_current(failures, FAILURE_SCHEMA, carried)
        as_volumes = {**{k: failures[k] for k in failures.column_names if k not in FAILURE_SCHEMA.names},
                      "id": failures["id"], "input_path": failures["path"], "bundle_hash": failures["bundle_hash"],
                      "status": pa.array(["failed"] * failures.num_rows, pa.string())}
        volume_parts = [pa.table(as_volumes), *_part_groups(layout, "volumes", done, pool, damaged)]
        volume_schema = _extra_schema(VOLUME_SCHEMA, volume_parts)
        volumes = pa.concat_tables([_conform(t, volume_schema) for t in volume_parts]).sort_by("id")
        volumes = _join_current(volumes, VOLUME_SCHEMA, carried)
        write_parquet(layout.table("volumes"), volumes.replace_schema_metadata(meta))
        lesion_parts = _part_groups(layout, "lesions", done, pool, damaged)
        n_lesions = _write_groups(lesion_parts, LESION_SCHEMA.with_metadata(meta), layout.table("lesions"))
    if damaged:  # each becomes a failure row (retried on resume), then the tables are rebuilt with them
        for stem in sorted(damaged):
            _record_damage(layout, stem)
        return {**consolidate(layout, inputs), "damaged": len(damaged)}
    write_parquet(layout.table("failures"), failures.replace_schema_metadata(meta))
    return {"volumes": volumes.num_rows, "lesions": n_lesions, "failures": failures.num_rows, "done": len(done),
            "damaged": 0}
