"""Turn command-line INPUTS into manifest rows: folders, globs, single files and CSV/Parquet lists.

Shared by `phanes screen` and `phanes data prepare`, so both see the same volumes under the same ids.

Rules
- A folder is searched recursively for ``*.nii`` / ``*.nii.gz``; a glob (``*``, ``?``, ``[``; ``**``
  recursive) keeps the NIfTI files it matches. Both skip files that look like masks or label maps rather
  than images: the file name without its NIfTI suffix, split at ``_ - .``, holds one of the words
  ``brain, mask, brainmask, lesion, lesions, seg, dseg, label, labels, labelmap`` (``sub-1_brain``,
  ``sub-1_brain_mask``, ``T1_lesion``, ``tumor_seg_model`` are skipped). A glob whose own file-name part
  holds such a word (``data/*_brain.nii.gz``) asks for those files and keeps them. Hidden files are
  skipped. The mask-like files a folder leaves out are returned as unused (``resolve_with_unused``), so
  commands can say what they did not take.
- A file named explicitly is taken as it is (even if it looks like a mask); a ``.csv``, ``.parquet`` or
  ``.pq`` file is a list of volumes with a path column ``image`` (or ``path``), and optional ``id`` (or
  ``subject_id``/``subject``), ``brain_mask``, ``lesion_mask``, ``split``, ``kind``, ``lesion_ml``
  columns. Relative paths resolve against the list's folder. Files in a list are not checked here: a
  missing one fails later as that volume's own error.
- Ids come from the list's id column or from the file name without its suffix; characters other than
  letters, digits, ``. _ -`` become ``_``. Derived ids that collide get their parent folder names
  prepended (``case1_T1``, ``case2_T1``) until unique, then a ``-2``, ``-3`` suffix in path order, so the
  same inputs always give the same ids. Ids from a list are kept verbatim and must be unique and usable
  as file names.
- A folder holding ``dataset_description.json`` is a BIDS dataset: ``bids.select_bids`` takes its raw T1w
  images (or ``--suffix``, narrowed by ``--bids-filter``), pairs ``desc-brain_mask`` files as brain masks,
  names ids after the files (``sub-01_ses-1``) and returns every other NIfTI file as unused, with its reason.
- A folder holding no NIfTI image but DICOM files is converted by dcm2niix into the DICOM cache the caller
  names (`dicom.py`: one volume per usable T1-weighted series, the series metadata as columns); a series
  that is not a usable T1 is returned with its reason (`Rejected`, its id and columns set). Without a cache
  (a listing, such as the count of unused files `screen` prints before it claims OUT) such a folder yields
  nothing.
- The same file reached twice (a folder and a glob, say) is listed once, at its first place; a list that
  names it under two ids keeps both rows. Linked folders are followed, each real folder once.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS, is_nifti_path, load_mask, load_volume
from phanes_cli.errors import InputError
from phanes_cli.infra.folders import check_id
from phanes_cli.inputs.bids import BidsQuery, is_bids_root, select_bids
from phanes_cli.inputs.dicom import convert_folder, holds_dicom
from phanes_cli.inputs.manifest import ManifestRow, cell_path, clean, lesion_volume, read_table, write_manifest

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
MASK_WORDS = frozenset(
    {"brain", "mask", "brainmask", "lesion", "lesions", "seg", "dseg", "label", "labels", "labelmap"}
)
IMAGE_COLUMNS = ("image", "path")
MASK_REASON = "the file name reads as a mask or label map (module rules); name the file, or a glob, to use it"
ID_COLUMNS = ("id", "subject_id", "subject")
DICOM_FOLDER = "dicom"  # the converted DICOM series, under the output (OUT/dicom, or beside a manifest)
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Rejected:
    """An input file that cannot be used, and why (the reason reads without the path)."""

    path: str
    reason: str
    id: str | None = None
    unused: bool = False  # True: a file found and deliberately left out (BIDS selection), not a broken one
    extra: dict[str, Any] = field(default_factory=dict)  # manifest columns of a rejected DICOM series


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (case-insensitive)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def looks_like_mask(path: str | Path) -> bool:
    """True when the file name names a mask or label map (see the module rules)."""
    words = re.split(r"[_\-.]", nifti_stem(path).lower())
    return any(word in MASK_WORDS for word in words)


def _folder_key(path: str | Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _scan_folder(folder: Path, exclude: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(NIfTI images, mask-like NIfTI files left out) under `folder`; linked folders are followed, but each real
    folder is read once (a link to a parent or to itself is no cycle) and `exclude` (the run's OUT) is never
    entered."""
    found: list[Path] = []
    masks: list[Path] = []
    seen = {_folder_key(folder)}
    skip = _folder_key(exclude) if exclude is not None else None
    for root, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            key = _folder_key(Path(root) / name)
            if key is not None and key not in seen and key != skip:
                seen.add(key)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if not name.startswith(".") and is_nifti_path(name):
                (masks if looks_like_mask(name) else found).append(Path(root) / name)
    return found, masks


def _inside(path: str | Path, folder: Path | None) -> bool:
    return folder is not None and Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def _expand_glob(pattern: str, exclude: Path | None = None) -> list[Path]:
    matches = sorted(glob.glob(pattern, recursive=True))
    wants_masks = looks_like_mask(Path(pattern).name)
    return [Path(m) for m in matches if Path(m).is_file() and is_nifti_path(m) and not _inside(m, exclude)
            and not Path(m).name.startswith(".") and (wants_masks or not looks_like_mask(m))]


def _read_list(path: Path) -> list[dict[str, Any]]:
    table = read_table(path, "volume list")
    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None:
        has = ", ".join(table.column_names)
        raise InputError(path, f"volume list needs a path column named 'image' or 'path'; it has {has}")
    records = table.to_pylist()
    if not records:  # blank lines are skipped by the reader: a header with 100,000 of them is an empty list
        raise InputError(path, "volume list has no rows (only a header and blank lines?)")
    for number, record in enumerate(records, start=2 if path.suffix.lower() == ".csv" else 1):
        if clean(record.get(column)) is None:
            raise InputError(path, f"row {number} has no {column!r} value")
    return [{**r, "_image": r[column]} for r in records]


@dataclass(frozen=True)
class _Found:
    """A discovered image before ids are settled."""

    image: Path
    id: str | None  # explicit id from a list
    record: dict[str, Any]


def _from_list(path: Path) -> list[_Found]:
    root = path.parent.absolute()
    found = []
    for record in _read_list(path):
        paths = {key: cell_path(record.get(key), root) for key in ("_image", "brain_mask", "lesion_mask")}
        id_column = next((c for c in ID_COLUMNS if clean(record.get(c)) is not None), None)
        explicit = None if id_column is None else clean(record[id_column])
        # only the column the id came from is dropped: a `subject` column beside `id` is carried through
        extra = {k: v for k, v in record.items() if k not in (*IMAGE_COLUMNS, id_column, "_image")}
        extra.update(brain_mask=paths["brain_mask"], lesion_mask=paths["lesion_mask"])
        found.append(_Found(image=paths["_image"], id=None if explicit is None else str(explicit), record=extra))  # type: ignore[arg-type]
    return found


def _from_dicom(folder: Path, exclude: Path | None, cache: Path | None) -> list[_Found]:
    """The converted volumes of a DICOM folder, each with its metadata columns and verdict (module rules)."""
    if cache is None:
        return []
    return [_Found(s.image, None, {**s.columns, "_dicom": (str(folder), s.label, s.rejection)})
            for s in convert_folder(folder, cache, exclude)]


def _discover(argument: str, exclude: Path | None = None, dicom_cache: Path | None = None
              ) -> tuple[list[_Found], list[Rejected]]:
    """The images one argument names, and the files of a folder it left out as masks (`Rejected.unused`)."""
    path = Path(argument)
    if path.is_dir():
        files, masks = _scan_folder(path, exclude)
        if not files and holds_dicom(path, exclude):
            return _from_dicom(path, exclude, dicom_cache), []
        if not files:
            raise InputError(path, "folder holds no NIfTI images (*.nii, *.nii.gz) besides masks")
        return [_Found(f, None, {}) for f in files], [Rejected(str(m), MASK_REASON, unused=True) for m in masks]
    if path.is_file():
        if path.name.lower().endswith(TABLE_SUFFIXES):
            return _from_list(path), []
        if is_nifti_path(path):
            return [_Found(path, None, {})], []
        raise InputError(path, "not a NIfTI image, a folder, or a CSV/Parquet volume list")
    if _GLOB_CHARS.search(argument):
        files = _expand_glob(argument, exclude)
        if not files:
            raise InputError(argument, "pattern matches no NIfTI images")
        return [_Found(f, None, {}) for f in files], []
    raise InputError(path, "not found")


def derive_id(path: str | Path) -> str:
    """A file-name-safe id from an image's file name."""
    name = _UNSAFE.sub("_", nifti_stem(path)) or "volume"
    return name.replace(".", "_") if name in (".", "..") else name  # '...nii.gz' names no folder


def _check_explicit(ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise InputError(value, "id appears more than once in the volume lists; ids must be unique")
        check_id(value, "volume list")
        if value.startswith("."):
            raise InputError(value, "id cannot be used as a file name (no leading '.' in a list's ids)")
        seen.add(value)


def _name_at(path: Path, depth: int) -> str:
    """The derived id with `depth` parent folder names prepended."""
    parents = path.absolute().parent.parts[1:]
    chosen = parents[len(parents) - depth:] if depth else ()
    return "_".join([*(_UNSAFE.sub("_", p) for p in chosen), derive_id(path)])


def _unique_ids(found: list[_Found]) -> list[str]:
    """Settle ids deterministically: explicit ids verbatim, derived ids made unique (module rules).

    Colliding derived ids take one more parent folder name per round; files that collide within one
    folder (or that have run out of parents) are numbered in path order instead.
    """
    _check_explicit(f.id for f in found if f.id is not None)
    ids: dict[int, str] = {i: f.id for i, f in enumerate(found) if f.id is not None}
    taken = set(ids.values())
    pending = [i for i, f in enumerate(found) if f.id is None]
    depth = 0
    while pending:
        names = {i: _name_at(found[i].image, depth) for i in pending}
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(names[i], []).append(i)
        deeper = []
        for name, group in groups.items():
            parents = {found[i].image.absolute().parent for i in group}
            exhausted = all(depth >= len(found[i].image.absolute().parent.parts) - 1 for i in group)
            if len(group) == 1 and name not in taken:
                ids[group[0]] = name
                taken.add(name)
            elif (len(group) > 1 and len(parents) == 1) or exhausted:
                for i in sorted(group, key=lambda k: str(found[k].image)):
                    candidate, n = name, 2
                    while candidate in taken:
                        candidate, n = f"{name}-{n}", n + 1
                    ids[i] = candidate
                    taken.add(candidate)
            else:
                deeper.extend(group)
        pending, depth = sorted(deeper), depth + 1
    return [ids[i] for i in range(len(found))]


def _from_bids(root: Path, query: BidsQuery, exclude: Path | None) -> tuple[list[_Found], list[Rejected]]:
    """The selected images of a BIDS root (ids, masks and entities set) and the unused files with reasons;
    nothing under `exclude` (screening's OUT) is used."""
    selection = select_bids(root, query.suffix, dict(query.filters), exclude)
    unused = [Rejected(path=str(s.path), reason=s.reason, unused=True) for s in selection.skipped]
    if not selection.rows:
        matching = " matching --bids-filter" if query.filters else ""
        raise InputError(root, f"BIDS dataset holds no {query.suffix} images{matching} "
                               f"({len(unused)} other NIfTI files; choose with --suffix / --bids-filter)")
    return [_Found(r.image, r.id, {**r.extra, "brain_mask": r.brain_mask}) for r in selection.rows], unused


def resolve_inputs(inputs: list[str], exclude: Path | None = None, bids: BidsQuery | None = None,
                   dicom_cache: Path | None = None) -> list[ManifestRow]:
    """Expand INPUTS into manifest rows (`resolve_with_unused` without the list of unused files)."""
    return resolve_with_unused(inputs, exclude, bids, dicom_cache)[0]


def resolve_with_unused(inputs: list[str], exclude: Path | None = None, bids: BidsQuery | None = None,
                        dicom_cache: Path | None = None) -> tuple[list[ManifestRow], list[Rejected]]:
    """Expand INPUTS into manifest rows with unique ids, in input order (folders/globs sorted).

    Folders and globs never yield files under `exclude` (screening's OUT, which may sit inside an input
    folder). The same file under two explicit ids of a list stays two rows (screened twice). Raises
    InputError for an argument that does not exist, matches nothing or cannot be read; files named
    inside a volume list are not opened here. Also returns the files of BIDS roots left out (`unused`)
    and the DICOM series that are not usable T1s (converted into `dicom_cache`; not `unused`).
    """
    if not inputs:
        raise InputError("INPUTS", "no inputs given; name folders, files, globs or a CSV/Parquet list")
    found: list[_Found] = []
    unused: list[Rejected] = []
    seen: set[Path] = set()
    for argument in inputs:
        if is_bids_root(argument):
            items, skipped = _from_bids(Path(argument), bids or BidsQuery(), exclude)
        else:
            items, skipped = _discover(argument, exclude, dicom_cache)
        unused.extend(skipped)
        for item in items:
            key = Path(os.path.normpath(item.image.absolute()))
            if key in seen and item.id is None:
                continue
            seen.add(key)
            found.append(item)
    rows = []
    for item, vid in zip(found, _unique_ids(found), strict=True):
        check_id(vid, item.image)
        record = dict(item.record)
        folder, label, reason = record.pop("_dicom", (None, None, None))
        if reason is not None:
            unused.append(Rejected(path=folder, reason=f"{label}: {reason}", id=vid,
                                   extra={k: v for k, v in record.items() if clean(v) is not None}))
            continue
        lesion_ml = lesion_volume(record.pop("lesion_ml", None), item.image, vid)
        rows.append(ManifestRow(
            id=vid,
            image=Path(os.path.normpath(item.image.absolute())),
            brain_mask=record.pop("brain_mask", None),
            lesion_mask=record.pop("lesion_mask", None),
            split=str(clean(record.pop("split", None)) or "test"),
            kind=str(clean(record.pop("kind", None)) or "unknown"),
            lesion_ml=lesion_ml,
            extra={k: v for k, v in record.items() if clean(v) is not None},
        ))
    return rows, unused


def validate_row(row: ManifestRow, max_voxels: int = DEFAULT_MAX_VOXELS) -> Rejected | None:
    """Open the image and its masks as screening would; None when usable, else the first reason."""
    try:
        volume = load_volume(row.image, max_voxels)
        for mask in (row.brain_mask, row.lesion_mask):
            if mask is not None:
                load_mask(mask, volume, max_voxels)
    except InputError as exc:
        return Rejected(path=exc.path, reason=exc.reason, id=row.id)
    except Exception as exc:  # a file no check foresaw: rejected on its own, the manifest is still written
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        return Rejected(path=str(row.image), reason=f"cannot be read ({type(exc).__name__}: {detail})", id=row.id)
    return None


def prepare_manifest(inputs: list[str], out: Path, validate: bool = True, max_voxels: int = DEFAULT_MAX_VOXELS,
                     bids: BidsQuery | None = None) -> tuple[list[ManifestRow], list[Rejected]]:
    """Resolve INPUTS, check each file (image and masks) and write the manifest of the usable ones.

    DICOM folders are converted into `dicom/` beside the manifest (`DICOM_FOLDER`).

    Files are checked in a few threads (decompression releases the GIL). Returns the written rows and
    every rejected file with its reason, in input order, then the files left out of BIDS roots
    (`Rejected.unused`).
    """
    rows, unused = resolve_with_unused(inputs, bids=bids, dicom_cache=Path(out).parent / DICOM_FOLDER)
    rejected: list[Rejected] = []
    if validate:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            verdicts = list(pool.map(lambda r: validate_row(r, max_voxels), rows))
        rejected = [v for v in verdicts if v is not None]
        rows = [r for r, v in zip(rows, verdicts, strict=True) if v is None]
    write_manifest(rows, out)
    return rows, rejected + unused
