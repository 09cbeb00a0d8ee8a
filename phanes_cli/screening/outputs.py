"""Where a screening run puts things, and the commit protocol that makes resume exact.

Layout of OUT:
    maps/<id>_anomaly.nii.gz, maps/<id>_lesionmask.nii.gz, maps/<id>_pseudohealthy.nii.gz
        (`_lesionmask`, not `_mask`: HD-BET and FSL name brain masks `_mask`)
    parts/volumes/<id>.parquet   one row, written when the volume is committed
    parts/lesions/<id>.parquet   its lesions (possibly zero rows)
    parts/failures/<id>.parquet  one row when the volume failed
    parts/done/<id>.json         the commit marker, written last
    volumes.parquet, lesions.parquet, failures.parquet   consolidated, sorted by id
    run.json                     the run manifest
<id> in a file name is `file_stem(id)`: the id itself, or for ids that start with '.' or are over-long a
shortened, hashed form (the tables keep the full id).

A volume counts as done only when its marker exists, records the same bundle hash and input file
(path, size, mtime) and lists every requested output file, and those files exist. Every file is
written atomically (temp name + rename), maps first, then lesion rows, volume row, marker; so a run
killed at any moment leaves either a committed volume or one that the next run redoes from scratch.
The part folders can be read as datasets while a run is going (`pandas.read_parquet("OUT/parts/volumes")`):
temporary files start with '.', which readers skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phanes_cli.atomic import atomic_path, write_json, write_parquet

SCHEMA_VERSION = "2"  # 2: `id` in every table, flat geometry columns, size bins, thresholds, manifest columns
OUTPUT_KINDS = ("anomaly", "mask", "pseudohealthy")
MAP_SUFFIX = {"anomaly": "anomaly", "mask": "lesionmask", "pseudohealthy": "pseudohealthy"}  # file name per kind
# `--layout bids`: OUT is a BIDS-derivatives dataset (its dataset_description.json says so, and every reader of
# OUT follows it); maps go to sub-<label>/[ses-<label>/]anat/<source entities>_<name>.nii.gz (bids_out.py).
BIDS_DESCRIPTION = "dataset_description.json"
BIDS_MAP_NAMES = {"anomaly": "desc-anomaly_map", "mask": "desc-lesion_mask", "pseudohealthy": "desc-pseudohealthy_T1w"}
_LIST_I = pa.list_(pa.int64())
_LIST_F = pa.list_(pa.float64())
# Lesion size bins in mL: [low, high) each; the counts per volume go to SIZE_BIN_COLUMNS.
SIZE_BINS_ML = ((0.0, 0.1), (0.1, 1.0), (1.0, 10.0), (10.0, float("inf")))
SIZE_BIN_COLUMNS = ("lesions_lt_0_1ml", "lesions_0_1_to_1ml", "lesions_1_to_10ml", "lesions_ge_10ml")
UNITS = {"*_ml": "millilitre", "*_mm, voxel_mm_*, voxel_size_mm": "millimetre (world, input affine)",
         "centroid_voxel, bbox_*, slice_*, shape*": "voxel indices in the input file's axis order",
         "lesion_burden_fraction": "fraction of brain_volume_ml", "*_s": "second",
         "*_anomaly, *_score, *_threshold": "anomaly score s(x) (mask_threshold: stage 1 map m(x))"}


def _schema(*fields: pa.Field[Any]) -> pa.Schema:
    return pa.schema(fields)


VOLUME_SCHEMA = _schema(
    pa.field("id", pa.string()),
    pa.field("input_path", pa.string()),
    pa.field("status", pa.string()),  # "ok" or "failed" (details in failures.parquet)
    pa.field("shape", _LIST_I),  # in the input file's voxel order
    pa.field("voxel_size_mm", _LIST_F),  # in the input file's voxel order
    *(pa.field(f"shape_{a}", pa.int64()) for a in "xyz"),  # `shape` flat: file axes 0, 1, 2
    *(pa.field(f"voxel_mm_{a}", pa.float64()) for a in "xyz"),  # `voxel_size_mm` flat
    pa.field("brain_mask_source", pa.string()),  # file, model (skull stripped) or threshold (skullstrip.py)
    pa.field("qc_flags", pa.list_(pa.string())),  # quality.check_volume warnings; [] when clean
    pa.field("brain_volume_ml", pa.float64()),
    pa.field("lesion_burden_ml", pa.float64()),
    pa.field("lesion_burden_fraction", pa.float64()),  # lesion_burden_ml / brain_volume_ml
    pa.field("lesion_count", pa.int64()),
    *(pa.field(name, pa.int64()) for name in SIZE_BIN_COLUMNS),  # lesion counts by size (SIZE_BINS_ML)
    pa.field("largest_lesion_ml", pa.float64()),
    pa.field("max_anomaly", pa.float64()),  # max of s(x) in the brain
    pa.field("mean_anomaly", pa.float64()),  # mean of s(x) over brain voxels
    pa.field("slices_processed", pa.int64()),
    pa.field("backend", pa.string()),
    pa.field("bundle_hash", pa.string()),
    pa.field("mask_threshold", pa.float64()),  # the thresholds and minimum lesion size the lesion mask used
    pa.field("anomaly_threshold", pa.float64()),
    pa.field("min_lesion_ml", pa.float64()),
    pa.field("runtime_s", pa.float64()),  # decode_s + inference_s + write_s
    pa.field("decode_s", pa.float64()),
    pa.field("inference_s", pa.float64()),
    pa.field("write_s", pa.float64()),
    pa.field("decode_node", pa.string()),  # IP of the Ray node that ran each stage
    pa.field("inference_node", pa.string()),
    pa.field("write_node", pa.string()),
)

LESION_SCHEMA = _schema(
    pa.field("id", pa.string()),  # the volume's id, the key of every table
    pa.field("lesion_index", pa.int64()),  # 1 = largest
    pa.field("volume_ml", pa.float64()),
    pa.field("voxel_count", pa.int64()),
    pa.field("centroid_voxel", _LIST_F),  # input file voxel order (i, j, k)
    pa.field("centroid_world_mm", _LIST_F),  # through the input affine
    *(pa.field(f"centroid_{a}_mm", pa.float64()) for a in "xyz"),  # `centroid_world_mm` flat
    pa.field("bbox_min", _LIST_I),  # inclusive, input file voxel order
    pa.field("bbox_max", _LIST_I),
    pa.field("mean_score", pa.float64()),
    pa.field("max_score", pa.float64()),
    pa.field("axial_axis", pa.int64()),  # the file axis running inferior-superior
    pa.field("slice_min", pa.int64()),  # along axial_axis, file voxel indices
    pa.field("slice_max", pa.int64()),
)

FAILURE_SCHEMA = _schema(
    pa.field("id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("stage", pa.string()),  # input, decode, inference, write
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
    pa.field("retry_on_resume", pa.bool_()),
    pa.field("input_size", pa.int64()),
    pa.field("input_mtime_ns", pa.int64()),
    pa.field("bundle_hash", pa.string()),
)

_TABLES = {"volumes": VOLUME_SCHEMA, "lesions": LESION_SCHEMA, "failures": FAILURE_SCHEMA}
_RESERVED = frozenset(VOLUME_SCHEMA.names) | frozenset(FAILURE_SCHEMA.names) | frozenset(LESION_SCHEMA.names)
PART_READERS = 4  # threads reading part files in `consolidate`
PART_GROUP = 128  # part files read and combined at a time (larger groups only cost memory)
THRESHOLD_COLUMNS = ("mask_threshold", "anomaly_threshold", "min_lesion_ml")


def manifest_columns(extra: dict[str, Any]) -> dict[str, str]:
    """The input's extra manifest columns (subject, session, site...) as text, for the volume and failure rows.

    A name that is already a column of the tables is carried as `input_<name>`.
    """
    return {(f"input_{k}" if k in _RESERVED else k): str(v) for k, v in extra.items() if v is not None}


def with_text_columns(schema: pa.Schema, rows: Iterable[dict[str, Any]]) -> pa.Schema:
    """`schema` plus one string column per key of `rows` it lacks (the run's manifest columns), sorted."""
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    return pa.schema([*schema, *(pa.field(k, pa.string()) for k in extra)])


def file_metadata(thresholds: dict[str, Any], bundle_hash: str | None) -> dict[str, str]:
    """Parquet key-value metadata of a table: schema version, units, thresholds, bundle hash, phanes version."""
    from phanes_cli import __version__

    return {"phanes.schema_version": SCHEMA_VERSION, "phanes.version": __version__, "phanes.units": json.dumps(UNITS),
            "phanes.thresholds": json.dumps(thresholds), "phanes.bundle_hash": bundle_hash or ""}


def bids_stem(vid: str) -> str:
    """A BIDS volume id (`sub-01_ses-2_desc-brain`) without its desc entity: the outputs add their own."""
    return "_".join(part for part in vid.split("_") if not part.startswith("desc-"))


def bids_folder(root: Path, vid: str) -> Path:
    """OUT/sub-<label>/[ses-<label>/]anat for a BIDS id (ids are checked to start with sub-<label> first)."""
    entities = dict(part.split("-", 1) for part in vid.split("_") if "-" in part)
    folder = root / f"sub-{entities['sub']}"
    return (folder / f"ses-{entities['ses']}" if "ses" in entities else folder) / "anat"


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


MAX_STEM_BYTES = 120  # leaves room for a map suffix and the '.tmp-' names of atomic writes within 255 bytes


def file_stem(vid: str) -> str:
    """The name an id's files take in OUT: the id itself, unless it starts with '.' or is over-long.

    Such ids become up to 80 bytes of the id (leading dots dropped), '~' and 16 hex digits of its sha256,
    so no output is hidden from readers or mistaken for a temporary ('.tmp-...') file, and no name
    exceeds the file system's limit. The tables keep the full id. Idempotent: a stem maps to itself.
    """
    if not vid.startswith(".") and len(vid.encode()) <= MAX_STEM_BYTES:
        return vid
    head = vid.lstrip(".").encode()[:80].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(vid.encode()).hexdigest()[:16]}"


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
        return self.root / "parts" / table / f"{file_stem(vid)}.parquet"

    def done_marker(self, vid: str) -> Path:
        return self.root / "parts" / "done" / f"{file_stem(vid)}.json"

    @property
    def bids(self) -> bool:
        """True for a `--layout bids` run (OUT holds a dataset_description.json)."""
        return (self.root / BIDS_DESCRIPTION).is_file()

    def map_path(self, vid: str, kind: str) -> Path:
        if self.bids:
            return bids_folder(self.root, vid) / f"{bids_stem(vid)}_{BIDS_MAP_NAMES[kind]}.nii.gz"
        return self.maps / f"{file_stem(vid)}_{MAP_SUFFIX[kind]}.nii.gz"

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
        paths += [p.with_name(p.name.removesuffix(".nii.gz") + ".json") for p in paths]  # BIDS sidecars
        paths += [self.done_marker(vid), *(self.part(t, vid) for t in _TABLES)]
        for path in paths:
            path.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Delete temp files a killed run left behind (only safe while holding the run lock)."""
        for folder in (self.maps, *(self.root / "parts" / t for t in (*_TABLES, "done"))):
            if folder.is_dir():
                for path in folder.glob(".tmp-*"):
                    path.unlink(missing_ok=True)
        for path in self.root.glob("sub-*/**/.tmp-*"):  # --layout bids maps
            path.unlink(missing_ok=True)


def run_metadata(layout: OutputLayout) -> dict[str, str]:
    """`file_metadata` of a screening run, from the calibration its run.json records (as applied)."""
    try:
        bundle = json.loads(layout.run_manifest.read_text()).get("bundle", {})
    except (OSError, json.JSONDecodeError):
        bundle = {}
    calibration = bundle.get("calibration", {})
    thresholds = {k: calibration.get(k, 0.0 if k == "min_lesion_ml" else None) for k in THRESHOLD_COLUMNS}
    return file_metadata(thresholds, bundle.get("hash"))


def commit_volume(layout: OutputLayout, vid: str, volume_row: dict[str, Any], lesion_rows: list[dict[str, Any]],
                  marker: dict[str, Any]) -> None:
    """Write a volume's rows and then its done marker (maps must already be written)."""
    write_parquet(layout.part("lesions", vid), table_from_rows(lesion_rows, LESION_SCHEMA))
    volume_schema = with_text_columns(VOLUME_SCHEMA, [volume_row])  # plus the input's manifest columns
    write_parquet(layout.part("volumes", vid), table_from_rows([volume_row], volume_schema))
    write_json(layout.done_marker(vid), marker)
    layout.part("failures", vid).unlink(missing_ok=True)


def record_failure(layout: OutputLayout, vid: str, row: dict[str, Any]) -> None:
    """Replace any previous output of `vid` by one failure row (a failed volume leaves no maps).

    Keys beyond FAILURE_SCHEMA are the input's manifest columns (`manifest_columns`), kept as text.
    """
    layout.clear(vid)
    write_parquet(layout.part("failures", vid), table_from_rows([row], with_text_columns(FAILURE_SCHEMA, [row])))


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
        yield _TABLES[table].empty_table()
    for start in range(0, len(ids), PART_GROUP):
        group = ids[start:start + PART_GROUP]
        tables = list(pool.map(_read_part, [layout.part(table, vid) for vid in group]))
        damaged.update(vid for vid, t in zip(group, tables, strict=True) if t is None)
        readable = [t for t in tables if t is not None] or [_TABLES[table].empty_table()]
        yield pa.concat_tables(readable, promote_options="default").combine_chunks()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order and types (columns it lacks are nulls)."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _text_schema(schema: pa.Schema, tables: Iterable[pa.Table]) -> pa.Schema:
    """`with_text_columns` for tables: `schema` plus the columns of `tables` it lacks, as sorted strings."""
    return with_text_columns(schema, [dict.fromkeys(t.column_names) for t in tables])


def _write_groups(groups: Iterable[pa.Table], schema: pa.Schema, target: Path) -> int:
    """Write tables into one Parquet file, one row group each; returns the number of rows."""
    written = 0
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for group in groups:
            writer.write_table(_conform(group, schema))
            written += group.num_rows
    return written


def consolidate(layout: OutputLayout) -> dict[str, int]:
    """Rebuild volumes/lesions/failures.parquet from the committed parts; deterministic order by id.

    Committed volumes come from their parts; a failed volume (failure part, no marker) appears in
    failures.parquet and as a 'failed' row in volumes.parquet. The volumes table (one row per volume) is
    sorted in memory; lesions stream through, a group of part files at a time. Idempotent: run it as often
    as you like.
    The input's manifest columns become string columns of volumes and failures (so the schema is per run),
    and every table carries `run_metadata` as Parquet key-value metadata. A part file that cannot be read
    (damaged after it was written) un-commits its volume, so the next run screens it again; `damaged`
    counts those volumes.
    """
    parts = layout.root / "parts"
    done = _ids_with(parts / "done", ".json")
    done_set = set(done)
    failed = [v for v in _ids_with(parts / "failures", ".parquet") if v not in done_set]
    meta, damaged = run_metadata(layout), set[str]()
    with ThreadPoolExecutor(PART_READERS) as pool:
        failure_parts = list(_part_groups(layout, "failures", failed, pool, damaged))
        failure_schema = _text_schema(FAILURE_SCHEMA, failure_parts)
        failures = pa.concat_tables([_conform(t, failure_schema) for t in failure_parts]).sort_by("id")
        as_volumes = {**{k: failures[k] for k in failures.column_names if k not in FAILURE_SCHEMA.names},
                      "id": failures["id"], "input_path": failures["path"], "bundle_hash": failures["bundle_hash"],
                      "status": pa.array(["failed"] * failures.num_rows, pa.string())}
        volume_parts = [pa.table(as_volumes), *_part_groups(layout, "volumes", done, pool, damaged)]
        volume_schema = _text_schema(VOLUME_SCHEMA, volume_parts)
        volumes = pa.concat_tables([_conform(t, volume_schema) for t in volume_parts]).sort_by("id")
        write_parquet(layout.table("volumes"), volumes.replace_schema_metadata(meta))
        lesion_parts = _part_groups(layout, "lesions", done, pool, damaged)
        n_lesions = _write_groups(lesion_parts, LESION_SCHEMA.with_metadata(meta), layout.table("lesions"))
    if damaged:  # un-commit those volumes (the next run redoes them), then rebuild the tables without them
        for vid in damaged:
            for path in (layout.done_marker(vid), *(layout.part(t, vid) for t in _TABLES)):
                path.unlink(missing_ok=True)
        return {**consolidate(layout), "damaged": len(damaged)}
    write_parquet(layout.table("failures"), failures.replace_schema_metadata(meta))
    return {"volumes": volumes.num_rows, "lesions": n_lesions, "failures": failures.num_rows, "done": len(done),
            "damaged": 0}
