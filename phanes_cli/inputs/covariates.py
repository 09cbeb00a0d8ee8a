"""Covariates of a BIDS dataset: `participants.tsv` and `sub-<label>/sub-<label>_sessions.tsv`, typed.

Their columns (site, group, age, sex...) join the manifest rows of the dataset's images, and through them
every screening table, so burden by group or site needs no join by hand. Rules:

- the files are UTF-8 TSV (BIDS); a file that is not UTF-8, has no `participant_id` / `session_id`
  column, repeats a column or an id, or has a row with more or fewer cells than its header is refused
  with one line naming the file (and the line): covariates silently wrong are worse than none;
- only `\n` or `\r\n` ends a line: other Unicode line separators (U+2028, U+0085...) are text of a cell;
- a file of more than `MAX_CARRIED_COLUMNS` columns is refused: every column becomes a column of every
  table and of each volume's part file (`infra.columns` says why the cap);
- cells and names are stripped of surrounding blanks (a leading byte-order mark too); `n/a` and empty
  cells are null; the id column itself is dropped (the `sub` / `ses` columns carry it);
- each column takes one type from all its values: int when every value is an integer without a leading
  zero ("007" stays text), else float when every value is a finite decimal number, else text;
- a column whose name the manifest or the BIDS entities already use (id, image, sub, ses...) is renamed
  `participants_<name>` / `sessions_<name>`, as is a sessions column a participants column already has;
- a participant or session absent from the file gets nulls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phanes_cli.errors import InputError
from phanes_cli.infra.columns import check_carried_width

NULLS = frozenset({"", "n/a"})
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"[-+]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")  # no inf, nan, 007


@dataclass(frozen=True)
class Covariates:
    """participant label -> its columns, and (participant, session) labels -> the session's columns."""

    participants: dict[str, dict[str, Any]]
    sessions: dict[tuple[str, str], dict[str, Any]]
    columns: tuple[str, ...]  # every column of both files

    def of(self, sub: str | None, ses: str | None) -> dict[str, Any]:
        """The covariate columns of one image (all columns present, nulls where the files say nothing)."""
        found = {**self.participants.get(sub or "", {}), **self.sessions.get((sub or "", ses or ""), {})}
        return {**dict.fromkeys(self.columns), **found}


def read_tsv(path: Path, key: str) -> tuple[list[str], dict[str, list[str | None]]]:
    """(column names without `key`, {key value: cells}) of a BIDS TSV; InputError for a malformed file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                               "BIDS TSV files are UTF-8: save it again as UTF-8") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from None
    lines = [(number, line.removesuffix("\r"))
             for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1) if line.strip()]
    if not lines:
        raise InputError(path, f"is empty; it needs a header with a {key} column")
    header = [name.strip() for name in lines[0][1].split("\t")]
    check_carried_width(path, len(header) - 1, "covariate columns")
    if key not in header:
        raise InputError(path, f"has no {key} column (header: {', '.join(header)})")
    if len(set(header)) < len(header):
        raise InputError(path, f"repeats a column name (header: {', '.join(header)})")
    rows: dict[str, list[str | None]] = {}
    for number, line in lines[1:]:
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) != len(header):
            raise InputError(path, f"line {number} has {len(cells)} cells, the header {len(header)} "
                                   "(cells are separated by one tab; write n/a for a missing value)")
        record = dict(zip(header, cells, strict=True))
        label = record.pop(key)
        if label in rows:
            raise InputError(path, f"line {number} repeats {key} {label!r}")
        rows[label] = [None if record[name] in NULLS else record[name] for name in header if name != key]
    return [name for name in header if name != key], rows


def typed(values: list[str | None]) -> list[Any]:
    """One column's cells as ints, else floats, else text (module rules); nulls stay None."""
    present = [v for v in values if v is not None]
    if present and all(_INT.fullmatch(v) for v in present):
        return [None if v is None else int(v) for v in values]
    if present and all(_DECIMAL.fullmatch(v) for v in present):
        return [None if v is None else float(v) for v in values]
    return values


def _participants(path: Path, reserved: set[str]) -> dict[str, dict[str, Any]]:
    """{participant label (without 'sub-'): {column: typed value}} of participants.tsv."""
    names, rows = read_tsv(path, "participant_id")
    labels = list(rows)
    renamed = [f"participants_{n}" if n in reserved else n for n in names]
    columns = [typed([rows[label][i] for label in labels]) for i in range(len(names))]
    return {label.removeprefix("sub-"): {name: column[row] for name, column in zip(renamed, columns, strict=True)}
            for row, label in enumerate(labels)}


def read_covariates(root: Path, reserved: set[str]) -> Covariates:
    """The covariates of a BIDS root (empty when it has neither file); `reserved`: names already taken."""
    participants: dict[str, dict[str, Any]] = {}
    if (root / "participants.tsv").is_file():
        participants = _participants(root / "participants.tsv", reserved)
    taken = reserved | {k for row in participants.values() for k in row}
    per_subject = {}
    for path in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
        names, rows = read_tsv(path, "session_id")
        per_subject[path.parent.name.removeprefix("sub-")] = (names, rows)
    names = sorted({n for subject_names, _ in per_subject.values() for n in subject_names})
    cells = [(sub, ses, dict(zip(subject_names, row, strict=True)))
             for sub, (subject_names, rows) in per_subject.items() for ses, row in rows.items()]
    columns = {n: typed([cell.get(n) for _, _, cell in cells]) for n in names}  # one type across all subjects
    sessions = {(sub, ses.removeprefix("ses-")): {(f"sessions_{n}" if n in taken else n): columns[n][i]
                                                  for n in names}
                for i, (sub, ses, _) in enumerate(cells)}
    every = {k: None for row in [*participants.values(), *sessions.values()] for k in row}  # in file order
    check_carried_width(root, len(every), "covariate columns in participants.tsv and the sessions.tsv files")
    return Covariates(participants, sessions, tuple(every))
