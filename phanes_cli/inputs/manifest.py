"""The manifest: the one table every command reads and writes to name volumes and their masks.

Columns: id, image, brain_mask, lesion_mask, split, kind, lesion_ml (+ any extra columns).
Paths are stored relative to the manifest's folder when they lie under it, and resolved against it on read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_parquet
from phanes_cli.infra.columns import cell, check_carried_width, column_type

MANIFEST_COLUMNS = ("id", "image", "brain_mask", "lesion_mask", "split", "kind", "lesion_ml")
_PATH_COLUMNS = ("image", "brain_mask", "lesion_mask")


@dataclass(frozen=True)
class ManifestRow:
    """One volume: its image, optional masks, and where it belongs."""

    id: str
    image: Path
    brain_mask: Path | None = None
    lesion_mask: Path | None = None
    split: str = "test"
    kind: str = "unknown"
    lesion_ml: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    path = Path(path).absolute()
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def write_manifest(rows: list[ManifestRow], path: str | Path) -> Path:
    """Write rows as Parquet, atomically; ids must be unique."""
    path = Path(path)
    root = path.parent.absolute()
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(path, f"duplicate ids in manifest: {', '.join(dupes[:5])}")
    extra_keys = sorted({k for r in rows for k in r.extra})
    columns: dict[str, list[Any]] = {
        "id": ids,
        "image": [_rel(r.image, root) for r in rows],
        "brain_mask": [_rel(r.brain_mask, root) for r in rows],
        "lesion_mask": [_rel(r.lesion_mask, root) for r in rows],
        "split": [r.split for r in rows],
        "kind": [r.kind for r in rows],
        "lesion_ml": [None if r.lesion_ml is None else float(r.lesion_ml) for r in rows],
    }
    schema: list[pa.Field] = [
        pa.field("id", pa.string()), pa.field("image", pa.string()), pa.field("brain_mask", pa.string()),
        pa.field("lesion_mask", pa.string()), pa.field("split", pa.string()), pa.field("kind", pa.string()),
        pa.field("lesion_ml", pa.float64()),
    ]
    arrays = {k: pa.array(v, type=f.type) for (k, v), f in zip(columns.items(), schema, strict=True)}
    for key in extra_keys:  # typed from their values (numbers stay numbers; mixed kinds become text)
        kind = column_type(r.extra.get(key) for r in rows)
        arrays[key] = pa.array([cell(r.extra.get(key), kind) for r in rows], kind)
    return write_parquet(path, pa.table(arrays))


# CSV columns read as text whatever they hold: ids such as "007" keep their zeros, paths stay paths.
TEXT_COLUMNS = ("id", "subject_id", "subject", "image", "path", "brain_mask", "lesion_mask", "split", "kind")


def read_table(path: Path, what: str) -> pa.Table:
    """Read a CSV or Parquet table of volumes (a manifest or a volume list); `what` names it in errors."""
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        if path.suffix.lower() == ".csv":
            types = pacsv.ConvertOptions(column_types={c: pa.string() for c in TEXT_COLUMNS})
            table = pacsv.read_csv(path, convert_options=types)
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"cannot read the {what} ({exc})") from exc
    check_carried_width(path, table.num_columns, "columns")
    return table


def clean(value: Any) -> Any:
    """A table cell, or None when it is empty: null, NaN or blank text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def cell_path(value: Any, root: Path) -> Path | None:
    """A path cell resolved against the table's folder (absolute paths stay), or None when empty."""
    value = clean(value)
    return None if value is None else Path(os.path.normpath(root / str(value)))


def lesion_volume(value: Any, path: Path, vid: Any) -> float | None:
    """A `lesion_ml` cell as a number of mL (text such as '12.5' included), None when empty."""
    value = clean(value)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"row {vid!r}: lesion_ml must be a number of mL, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(path, f"row {vid!r}: lesion_ml must be a finite number >= 0, got {value!r}")
    return number


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a manifest (Parquet or CSV); relative paths resolve against its folder; ids must be unique."""
    path = Path(path)
    table = read_table(path, "manifest")
    missing = [c for c in ("id", "image") if c not in table.column_names]
    if missing:
        has = ", ".join(table.column_names)
        raise InputError(path, f"manifest lacks required column(s) {', '.join(missing)}; has {has}")
    root = path.parent.absolute()
    rows: list[ManifestRow] = []
    for record in table.to_pylist():
        paths = {key: cell_path(record.get(key), root) for key in _PATH_COLUMNS}
        if paths["image"] is None:
            raise InputError(path, f"row {record.get('id')!r} has no image path")
        rows.append(
            ManifestRow(
                id=str(record["id"]),
                image=paths["image"],
                brain_mask=paths["brain_mask"],
                lesion_mask=paths["lesion_mask"],
                split=str(clean(record.get("split")) or "test"),
                kind=str(clean(record.get("kind")) or "unknown"),
                lesion_ml=lesion_volume(record.get("lesion_ml"), path, record["id"]),
                extra={k: v for k, v in record.items() if k not in MANIFEST_COLUMNS},
            )
        )
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
    if dupes:
        raise InputError(path, f"duplicate ids in manifest: {', '.join(dupes[:5])}; each volume needs its own id")
    return rows


def select(rows: list[ManifestRow], split: str | None = None, kind: str | None = None) -> list[ManifestRow]:
    return [r for r in rows if (split is None or r.split == split) and (kind is None or r.kind == kind)]
