"""`phanes stats`: a run's lesion masks and tables again, from its anomaly maps, at new thresholds.

No network is loaded: each volume's written map s(x) (OUT/maps/<id>_anomaly.nii.gz) goes through the
screening road again, `core.lesion_rule.LesionRule` (threshold, then the minimum lesion size) and
`core.statistics.volume_statistics`, so at the run's own thresholds the tables equal screening's. The
lesion rule works inside the brain mask the run wrote (`layout.brain_mask_files`; for a run from before, the
support of s(x), zero outside the brain, stands in), and lesions are placed (`core.locations`) in the run's
input image when it is still there unchanged (its sha256 as screened), else their location columns are null.
The threshold-free brain numbers (brain volume, max and mean of s(x)) come from the screening row. The
stage 1 threshold cannot change without the networks; it is reported as the run used it. Timing and node
columns are null: they describe screening.

Each volume keeps the calibration its own row records (an OUT may hold volumes of two bundles, the
second screened on a subset), with `--threshold` / `--min-lesion-ml` applied on top; run.json's stands
in for rows without one. Ids read back from the tables pass `layout.check_id` and every path written
resolves inside the stats folder, which must be new, empty or an earlier stats output (`claim_folder`):
never the run itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.recipe import measure_volume
from phanes_cli.core.volume_io import Volume, load_mask, load_volume, save_like
from phanes_cli.errors import BundleError, ConfigError, InputError
from phanes_cli.infra.atomic import atomic_path, write_json, write_parquet
from phanes_cli.infra.folders import check_id, claim_folder, inside
from phanes_cli.run_folder.commit import input_sha256
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    THRESHOLD_COLUMNS,
    VOLUME_SCHEMA,
    file_metadata,
    table_from_rows,
    with_extra_columns,
)
from phanes_cli.screening.tasks import describe

FORMATS = ("parquet", "csv", "json")
_BRAIN_COLUMNS = ("brain_volume_ml", "max_anomaly", "mean_anomaly")
_SCREENING_ONLY = ("runtime_s", "decode_s", "brain_mask_s", "inference_s", "write_s", "decode_node", "inference_node",
                   "write_node")
_MAP_VOXEL_LIMIT = 2**40  # the maps were written by screening, which already bounded the volume size


@dataclass(frozen=True)
class StatsResult:
    """What `phanes stats` wrote: the folder, its tables and the counts."""

    out: Path
    calibration: Calibration
    tables: dict[str, Path]
    volumes: int
    failed: int
    lesions: int


def applied_calibration(layout: OutputLayout) -> tuple[Calibration, str | None]:
    """The calibration a screening run applied (run.json) and its bundle hash."""
    try:
        bundle = json.loads(layout.run_manifest.read_text())["bundle"]
        calibration = Calibration.from_dict(bundle["calibration"], layout.run_manifest)
    except FileNotFoundError as exc:
        raise InputError(layout.root, "not a `phanes screen` output folder (no run.json)") from exc
    except (OSError, ValueError, KeyError, TypeError, BundleError) as exc:
        raise InputError(layout.run_manifest, f"run manifest lacks the bundle's calibration ({exc})") from exc
    return calibration, bundle.get("hash")


def row_calibration(row: dict[str, Any], base: Calibration, threshold: float | None,
                    min_lesion_ml: float | None) -> Calibration:
    """The calibration a volume's row records (`base` for rows without one), with the overrides applied."""
    recorded = {k: row.get(k) for k in THRESHOLD_COLUMNS}
    own = base
    if all(isinstance(v, (int, float)) for v in recorded.values()):
        own = Calibration.from_dict(recorded, f"volumes.parquet row {str(row.get('id'))[:200]!r}")
    return own.with_lesion_rule(threshold, min_lesion_ml)


def restat_volume(row: dict[str, Any], layout: OutputLayout, calibration: Calibration, target: OutputLayout
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One screened volume again: its anomaly map -> lesion mask (written under `target`) -> its rows."""
    vid = check_id(row.get("id"), layout.table("volumes"))
    path = layout.map_path(vid, "anomaly")
    if not path.is_file():
        raise InputError(path, "anomaly map not found (screen with --anomaly-maps to use `phanes stats`)")
    volume = load_volume(path, _MAP_VOXEL_LIMIT)
    anomaly = volume.data
    used = layout.map_path(vid, "brain_mask")
    brain = load_mask(used, volume, _MAP_VOXEL_LIMIT) if used.is_file() else anomaly > 0
    t1 = _input_image(row, volume)
    measures = measure_volume(vid, volume if t1 is None else t1, brain, anomaly, calibration,
                              row.get("qc_flags") or (), {k: row[k] for k in _BRAIN_COLUMNS}, locate=t1 is not None)
    save_like(measures.lesion_mask.astype(np.uint8), volume, target.map_path(vid, "lesion_mask"), np.uint8)
    return {**row, **measures.row, **dict.fromkeys(_SCREENING_ONLY)}, measures.lesions


def _input_image(row: dict[str, Any], anomaly: Volume) -> Volume | None:
    """The run's input image when it is still there, unchanged (sha256 as screened) and on the map's grid."""
    path, recorded = row.get("input_path"), row.get("input_sha256")
    try:
        if not isinstance(path, str) or not isinstance(recorded, str) or input_sha256(path) != recorded:
            return None
        image = load_volume(path, _MAP_VOXEL_LIMIT)
    except (OSError, InputError):
        return None
    same = image.data.shape == anomaly.data.shape and np.allclose(image.affine, anomaly.affine, atol=1e-3)
    return image if same else None


def _failed_row(row: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """A volume row with null metrics: only its identity and manifest columns."""
    keep = ("id", "input_path", "bundle_hash", "brain_mask_source", *extra)
    return {**{k: row.get(k) for k in keep}, "status": "failed"}


def _read_run_table(path: Path) -> pa.Table:
    """A run's table as written, or an InputError naming it (a received run folder may hold anything)."""
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a readable Parquet table ({exc})") from exc


def compute(run_dir: Path, rule: Callable[[dict[str, Any]], Calibration], out: Path
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volume, lesion and failure rows for every volume of the run (its failures stay failures);
    `rule` gives each screened row its calibration (`row_calibration`)."""
    layout = OutputLayout(run_dir)
    if not layout.table("volumes").is_file():
        raise InputError(layout.table("volumes"), "not found: is this the OUT folder of a `phanes screen` run?")
    screened = _read_run_table(layout.table("volumes"))
    extra = [n for n in screened.column_names if n not in VOLUME_SCHEMA.names]
    earlier = _read_run_table(layout.table("failures")).to_pylist() if layout.table("failures").is_file() else []
    volumes: list[dict[str, Any]] = []
    lesions: list[dict[str, Any]] = []
    failures = list(earlier)
    target = OutputLayout(out)
    inside(target.root, target.maps).mkdir(exist_ok=True)
    for row in screened.to_pylist():
        if row.get("status") != "ok":
            volumes.append(_failed_row(row, extra))
            continue
        try:
            volume_row, lesion_rows = restat_volume(row, layout, rule(row), target)
        except Exception as exc:  # a missing or broken map fails this volume only
            kind, message = describe(exc)
            failures.append({**{k: row.get(k) for k in extra}, "id": row.get("id"), "path": row.get("input_path"),
                             "stage": "stats", "error_type": kind, "message": message, "retry_on_resume": True,
                             "bundle_hash": row.get("bundle_hash")})
            volumes.append(_failed_row(row, extra))
            continue
        volumes.append(volume_row)
        lesions.extend(lesion_rows)
    return volumes, lesions, sorted(failures, key=lambda r: str(r.get("id")))


def write_table(table: pa.Table, target: Path, fmt: str) -> Path:
    """One table in `fmt`: Parquet with key-value metadata, CSV (list cells as JSON text) or JSON."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if fmt == "parquet":
        return write_parquet(target, table)
    if fmt == "json":
        return write_json(target, {"metadata": meta, "rows": table.to_pylist()})
    flat = table.replace_schema_metadata(None)
    for i, field in enumerate(flat.schema):
        if pa.types.is_list(field.type):
            text = pa.array([None if v is None else json.dumps(v) for v in flat.column(i).to_pylist()], pa.string())
            flat = flat.set_column(i, field.name, text)
    with atomic_path(target) as tmp:
        pacsv.write_csv(flat, tmp)
    return target


def run_stats(run_dir: Path, out: Path | None = None, threshold: float | None = None,
              min_lesion_ml: float | None = None, fmt: str = "parquet") -> StatsResult:
    """Recompute a run's lesion masks and tables into `out` (default RUN_DIR/stats) at the given thresholds.

    Defaults are the thresholds and minimum lesion size the run applied (run.json). Writes
    maps/<id>_lesionmask.nii.gz, volumes/lesions/failures.<fmt> and stats.json (thresholds, counts).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    base, bundle_hash = applied_calibration(OutputLayout(run_dir))
    calibration = base.with_lesion_rule(threshold, min_lesion_ml)
    out = inside(run_dir, run_dir / "stats") if out is None else Path(out)
    claim_folder(out, ("stats.json",), "a `phanes stats` output")
    write_json(out / "stats.json", {"run": str(run_dir.absolute()), "status": "running"})  # marks the folder as ours
    volumes, lesions, failures = compute(
        run_dir, lambda row: row_calibration(row, base, threshold, min_lesion_ml), out)
    meta = file_metadata(calibration.columns(), bundle_hash)
    tables = {"volumes": table_from_rows(volumes, with_extra_columns(VOLUME_SCHEMA, volumes)),
              "lesions": table_from_rows(lesions, LESION_SCHEMA),
              "failures": table_from_rows(failures, with_extra_columns(FAILURE_SCHEMA, failures))}
    paths = {name: write_table(t.replace_schema_metadata(meta), inside(out, out / f"{name}.{fmt}"), fmt)
             for name, t in tables.items()}
    failed = sum(1 for v in volumes if v["status"] != "ok")
    per_volume = len({tuple(v.get(k) for k in THRESHOLD_COLUMNS) for v in volumes if v["status"] == "ok"}) > 1
    write_json(out / "stats.json", {"run": str(run_dir.absolute()), "status": "finished", **calibration.columns(),
                                    "bundle_hash": bundle_hash, "per_volume_thresholds": per_volume, "format": fmt,
                                    "volumes": len(volumes), "failed": failed, "lesions": len(lesions),
                                    "metadata": meta})
    return StatsResult(out=out, calibration=calibration, tables=paths, volumes=len(volumes), failed=failed,
                       lesions=len(lesions))
