"""One Arrow type per carried column (manifest covariates in the manifest and the screening tables).

A column carried from the inputs (site, age, subject...) keeps the type its values have: numbers stay numbers.
Its values may arrive in pieces (a one-row part file per volume, written by different runs), so the type is
settled from all of them: nulls take any type, int and float make float, anything else mixed makes text.

An input carries at most `MAX_CARRIED_COLUMNS` such columns: each becomes a column of every volume's part files
and of the tables, and Parquet's cost per file grows with its columns (a one-row file of 1,000 columns is
0.3 MB, of 10,000 columns 2.9 MB and ten times slower to write and read). The reader of each kind of input
refuses a wider file in one line (`check_carried_width`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from phanes_cli.errors import InputError

MAX_CARRIED_COLUMNS = 1000


def check_carried_width(path: Path, columns: int, what: str) -> None:
    """An InputError when an input file would carry more than MAX_CARRIED_COLUMNS columns into the tables."""
    if columns > MAX_CARRIED_COLUMNS:
        raise InputError(path, f"has {columns:,} {what}; phanes carries at most {MAX_CARRIED_COLUMNS:,} into its "
                               "tables: keep the columns you need in a copy of the file")


def value_type(value: Any) -> pa.DataType:
    """The Arrow type of one Python value (null for None)."""
    if value is None:
        return pa.null()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.string()


def unify(types: Iterable[pa.DataType]) -> pa.DataType:
    """The type that holds every value of `types` (module rules); null when all are null."""
    found = {t for t in types if not pa.types.is_null(t)}
    if not found:
        return pa.null()
    if len(found) == 1:
        return found.pop()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in found):
        return pa.float64()
    return pa.string()


def column_type(values: Iterable[Any]) -> pa.DataType:
    """One type for a column of Python values; text when they are all null (the column stays readable)."""
    settled = unify(value_type(v) for v in values)
    return pa.string() if pa.types.is_null(settled) else settled


def cell(value: Any, kind: pa.DataType) -> Any:
    """`value` ready for a column of type `kind`: text for a text column, a float for a float column."""
    if value is None:
        return None
    if pa.types.is_string(kind) and not isinstance(value, str):
        return str(value)
    if pa.types.is_floating(kind) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def cast_column(column: pa.ChunkedArray | pa.Array, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """`column` as `kind`; values Arrow cannot cast (a list to text) go through `str`."""
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([cell(v, kind) for v in column.to_pylist()], kind)
