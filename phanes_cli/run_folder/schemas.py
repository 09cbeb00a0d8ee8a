"""The tables a screening run writes: their Parquet schemas, units, size bins and key-value metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from phanes_cli.core.calibration import THRESHOLD_COLUMNS
from phanes_cli.core.statistics import LOCATION_BURDEN_COLUMNS, SIZE_BIN_COLUMNS
from phanes_cli.infra.columns import cell, column_type, unify
from phanes_cli.infra.versions import __version__

SCHEMA_VERSION = "5"  # 2: `id` in every table, flat geometry columns, size bins, thresholds, manifest columns;
# 3: slices_inpainted, brain_mask_s; 4: input_sha256; 5: brain_mask_path, lesion locations and burden per location

_LIST_I = pa.list_(pa.int64())

_LIST_F = pa.list_(pa.float64())


UNITS = {"*_ml": "millilitre", "*_mm, voxel_mm_*, voxel_size_mm": "millimetre (world, input affine)",
         "centroid_voxel, bbox_*, slice_*, shape*": "voxel indices in the input file's axis order",
         "lesion_burden_fraction": "fraction of brain_volume_ml", "*_s": "second",
         "*_anomaly, *_score, *_threshold": "anomaly score s(x) (mask_threshold: stage 1 map m(x))"}

def _schema(*fields: pa.Field[Any]) -> pa.Schema:
    return pa.schema(fields)

VOLUME_SCHEMA = _schema(
    pa.field("id", pa.string()),
    pa.field("input_path", pa.string()),
    pa.field("input_sha256", pa.string()),  # of the input file when it was screened
    pa.field("status", pa.string()),  # "ok" or "failed" (details in failures.parquet)
    pa.field("shape", _LIST_I),  # in the input file's voxel order
    pa.field("voxel_size_mm", _LIST_F),  # in the input file's voxel order
    *(pa.field(f"shape_{a}", pa.int64()) for a in "xyz"),  # `shape` flat: file axes 0, 1, 2
    *(pa.field(f"voxel_mm_{a}", pa.float64()) for a in "xyz"),  # `voxel_size_mm` flat
    pa.field("brain_mask_source", pa.string()),  # file, model (skull stripped) or threshold (inputs/brain_masks.py)
    pa.field("brain_mask_path", pa.string()),  # the brain mask screened in, as written (relative to OUT)
    pa.field("qc_flags", pa.list_(pa.string())),  # quality.check_volume warnings; [] when clean
    pa.field("brain_volume_ml", pa.float64()),
    pa.field("lesion_burden_ml", pa.float64()),
    pa.field("lesion_burden_fraction", pa.float64()),  # lesion_burden_ml / brain_volume_ml
    pa.field("lesion_count", pa.int64()),
    *(pa.field(name, pa.int64()) for name in SIZE_BIN_COLUMNS),  # lesion counts by size (SIZE_BINS_ML)
    pa.field("largest_lesion_ml", pa.float64()),
    *(pa.field(name, pa.float64()) for name in LOCATION_BURDEN_COLUMNS.values()),  # burden per location class
    pa.field("max_anomaly", pa.float64()),  # max of s(x) in the brain
    pa.field("mean_anomaly", pa.float64()),  # mean of s(x) over brain voxels
    pa.field("slices_processed", pa.int64()),
    pa.field("slices_inpainted", pa.int64()),  # of those, slices with a non-empty inpainting mask (stage 2 ran)
    pa.field("backend", pa.string()),
    pa.field("bundle_hash", pa.string()),
    *(pa.field(name, pa.float64()) for name in THRESHOLD_COLUMNS),  # the operating point the lesion mask used
    pa.field("runtime_s", pa.float64()),  # decode_s + inference_s + write_s
    pa.field("decode_s", pa.float64()),  # reading, brain mask, QC and preprocessing
    pa.field("brain_mask_s", pa.float64()),  # the brain mask's part of decode_s
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
    pa.field("location", pa.string()),  # periventricular, juxtacortical, deep_white_matter, infratentorial
    pa.field("csf_contact", pa.string()),  # ventricle, sulcal or none: the CSF it lies in or against
    pa.field("csf_fraction", pa.float64()),  # share of its voxels with CSF intensity
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

TABLES = {"volumes": VOLUME_SCHEMA, "lesions": LESION_SCHEMA, "failures": FAILURE_SCHEMA}

_RESERVED = frozenset(VOLUME_SCHEMA.names) | frozenset(FAILURE_SCHEMA.names) | frozenset(LESION_SCHEMA.names)


def manifest_columns(extra: dict[str, Any]) -> dict[str, Any]:
    """The input's extra manifest columns (subject, site, age...) for the volume and failure rows, typed.

    A name that is already a column of the tables is carried as `input_<name>` (`input_input_<name>` when
    the input also has `input_<name>`, and so on): no column of the input is lost or overwritten. Nulls are
    left out (a column missing from a part file is null there).
    """
    kept = {k: v for k, v in extra.items() if v is not None}
    out = {k: v for k, v in kept.items() if k not in _RESERVED}
    for key, value in kept.items():
        if key in _RESERVED:
            name = f"input_{key}"
            while name in _RESERVED or name in kept or name in out:
                name = f"input_{name}"
            out[name] = value
    return out

def with_extra_columns(schema: pa.Schema, rows: Iterable[dict[str, Any]]) -> pa.Schema:
    """`schema` plus one column per key of `rows` it lacks (the run's manifest columns), sorted, each typed
    from its values (`infra.columns`: numbers stay numbers)."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    return pa.schema([*schema, *(pa.field(k, column_type(r.get(k) for r in rows)) for k in extra)])

def extra_fields(schema: pa.Schema, tables: Iterable[pa.Schema]) -> pa.Schema:
    """`schema` plus the columns of `tables` it lacks, sorted, each with the type that holds all its parts."""
    types: dict[str, list[pa.DataType]] = {}
    known = set(schema.names)
    for table in tables:
        for field in table:
            if field.name not in known:
                types.setdefault(field.name, []).append(field.type)
    settled = {name: unify(kinds) for name, kinds in types.items()}
    return pa.schema([*schema, *(pa.field(n, pa.string() if pa.types.is_null(t) else t)
                                 for n, t in sorted(settled.items()))])

def file_metadata(thresholds: dict[str, Any], bundle_hash: str | None) -> dict[str, str]:
    """Parquet key-value metadata of a table: schema version, units, thresholds, bundle hash, phanes version."""
    return {"phanes.schema_version": SCHEMA_VERSION, "phanes.version": __version__, "phanes.units": json.dumps(UNITS),
            "phanes.thresholds": json.dumps(thresholds), "phanes.bundle_hash": bundle_hash or ""}

def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema` (missing keys are nulls, so empty tables keep their types)."""
    return pa.Table.from_pylist([{f.name: cell(r.get(f.name), f.type) for f in schema} for r in rows], schema=schema)
