"""BIDS datasets in: the T1w images of a BIDS root, their brain masks, and why every other NIfTI is left out.

A folder holding `dataset_description.json` is a BIDS root. bids2table (the BIDS-schema-aware indexer of
the BIDS community; light: pyarrow only) indexes it and the datasets nested under `derivatives/`. Then:

- images: raw-dataset files whose suffix is `suffix` (T1w by default; `--suffix`), matching every
  `--bids-filter key=value`, NIfTI only. Derivatives are never images: they are processed data
  (a skull-stripped `desc-brain_T1w` in the raw tree is an image, a derivative one is not);
- brain masks: `desc-brain_mask` files (raw or derivatives) in the image's space (no `space` entity,
  `space-T1w` and `space-orig` being the same) with the same sub, ses, acq, ce, rec and run, paired to that image;
- ids: the image's file name without its suffix (`sub-01_ses-1_run-2`), unique in a dataset; the entities
  sub, ses, acq and run travel as manifest columns of those names into the screening tables, and so do
  the columns of `participants.tsv` and `sessions.tsv` (`covariates`, typed);
- template-space images (a `space` entity other than T1w / orig, such as fMRIPrep's
  `space-MNI152NLin2009cAsym_desc-preproc_T1w` beside its native `desc-preproc_T1w`) are left out unless
  `--bids-filter space=<label>` asks for that space: screening them too would count every subject twice;
  brain masks pair within one space;
- every other NIfTI file under the root is listed with the reason it was not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phanes_cli.errors import ConfigError
from phanes_cli.infra.optional import require
from phanes_cli.inputs.covariates import read_covariates
from phanes_cli.inputs.manifest import MANIFEST_COLUMNS, ManifestRow

DESCRIPTION = "dataset_description.json"
CARRIED = ("sub", "ses", "acq", "run")  # entities that become manifest columns
PAIRING = ("sub", "ses", "acq", "ce", "rec", "run")  # a brain mask belongs to the image that agrees on all
NATIVE_SPACES = (None, "T1w", "orig")  # a mask in another space (MNI152...) is not on the image's grid
NIFTI_EXTS = (".nii", ".nii.gz")
RESERVED = {*MANIFEST_COLUMNS, *CARRIED, "brain_mask_source"}  # covariate names that get a prefix


def is_bids_root(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DESCRIPTION).is_file()


@dataclass(frozen=True)
class Skipped:
    """A file found under the root and not used, with the reason."""

    path: Path
    reason: str


@dataclass(frozen=True)
class BidsSelection:
    rows: list[ManifestRow]
    skipped: list[Skipped]


@dataclass(frozen=True)
class BidsQuery:
    """Which images of a BIDS root to take: `--suffix` and `--bids-filter ENTITY=VALUE` (all must match)."""

    suffix: str = "T1w"
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_options(cls, suffix: str, filters: list[str] | None) -> BidsQuery:
        return cls(suffix, tuple(parse_filters(filters).items()))


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """`--bids-filter key=value` options -> {entity: value}; a ConfigError names a malformed one."""
    filters: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--bids-filter {item!r}: expected ENTITY=VALUE, for example ses=01 or acq=mprage")
        filters[key.strip()] = value.strip()
    return filters


def _index(root: Path) -> list[dict[str, Any]]:
    """Every BIDS NIfTI file of the root and its derivatives, as entity records with `file` and `raw`."""
    bids2table = require("bids2table", "BIDS inputs")  # [bids] extra, imported here: only BIDS inputs need it
    find_bids_datasets, index_dataset = bids2table.find_bids_datasets, bids2table.index_dataset

    records = []
    for dataset in find_bids_datasets(root):
        for record in index_dataset(dataset).to_pylist():
            if record["ext"] in NIFTI_EXTS:
                records.append({**record, "file": Path(record["root"]) / record["path"],
                                "raw": Path(dataset).resolve() == root.resolve()})
    return records


def _space(record: dict[str, Any]) -> str | None:
    """The record's space, None for the image's own (no space entity, or T1w / orig)."""
    return None if record.get("space") in NATIVE_SPACES else str(record["space"])


def _mismatch(record: dict[str, Any], suffix: str, filters: dict[str, str]) -> str | None:
    """Why a raw file is not an image, or None when it is one."""
    if record["suffix"] != suffix:
        return f"suffix {record['suffix']!r}, not {suffix!r} (choose with --suffix)"
    if _space(record) is not None and "space" not in filters:
        return (f"template space {record['space']!r}, not the subject's own (screen it with "
                f"--bids-filter space={record['space']})")
    for key, want in filters.items():
        if key not in record and key not in dict(record["extra_entities"] or []):
            raise ConfigError(f"--bids-filter {key}={want}: {key!r} is not a BIDS entity")
        have = record.get(key, dict(record["extra_entities"] or []).get(key))
        if have is None or str(have) != want:
            return f"{key}={have if have is not None else '(none)'} does not match --bids-filter {key}={want}"
    return None


def _row_id(record: dict[str, Any]) -> str:
    name = Path(record["path"]).name
    return name[: -len(f"_{record['suffix']}{record['ext']}")]


def _pair_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (*(record.get(k) for k in PAIRING), _space(record))


OWN_OUTPUT = "in OUT, the screening run's own output"


def select_bids(root: str | Path, suffix: str = "T1w", filters: dict[str, str] | None = None,
                exclude: Path | None = None) -> BidsSelection:
    """The images of a BIDS root as manifest rows (brain masks paired), and every unused NIfTI with its reason.

    Files under `exclude` (screening's OUT, often `derivatives/phanes` of the same root) are never images
    nor brain masks: a brain mask written by an earlier run must not come back as a given one.
    """
    root = Path(root)
    filters = filters or {}
    out = None if exclude is None else exclude.resolve()
    every = _index(root)
    records, skipped = [], []
    for record in every:
        if out is not None and record["file"].resolve().is_relative_to(out):
            skipped.append(Skipped(record["file"], OWN_OUTPUT))
        else:
            records.append(record)
    images = []
    for record in records:
        if not record["raw"]:
            continue
        if record["suffix"] == "mask":
            continue  # a mask is judged with the other masks below
        reason = _mismatch(record, suffix, filters)
        if reason is None:
            images.append(record)
        else:
            skipped.append(Skipped(record["file"], reason))
    masks = _pair_masks(images, [r for r in records if r["suffix"] == "mask"], skipped)
    for record in records:
        if not record["raw"] and record["suffix"] != "mask":
            reason = f"derivatives ({record['dataset']}): processed data, not an input image"
            skipped.append(Skipped(record["file"], reason))
    known = {r["file"].resolve() for r in every}
    for path in sorted(p for ext in NIFTI_EXTS for p in root.rglob(f"*{ext}")):
        if path.resolve() in known or not path.is_file():
            continue
        own = out is not None and path.resolve().is_relative_to(out)
        skipped.append(Skipped(path, OWN_OUTPUT if own else
                               "not a BIDS file name (sub-<label>[_<entity>-<label>...]_<suffix>.nii[.gz])"))
    covariates = read_covariates(root, RESERVED)
    rows = [ManifestRow(id=_row_id(r), image=r["file"], brain_mask=masks.get(id(r)),
                        extra={**{k: (None if r[k] is None else str(r[k])) for k in CARRIED},
                               **covariates.of(r["sub"], r["ses"])}) for r in images]
    return BidsSelection(rows=rows, skipped=sorted(skipped, key=lambda s: str(s.path)))


def _pair_masks(images: list[dict[str, Any]], masks: list[dict[str, Any]], skipped: list[Skipped]) -> dict[int, Path]:
    """id(image record) -> its desc-brain_mask file; unused masks go to `skipped` with the reason."""
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for image in images:
        by_key.setdefault(_pair_key(image), []).append(image)
    paired: dict[int, Path] = {}
    for mask in sorted(masks, key=lambda m: (not m["raw"], str(m["file"]))):  # raw masks first, then by name
        targets = by_key.get(_pair_key(mask), [])
        if mask["desc"] != "brain":
            skipped.append(Skipped(mask["file"], f"a mask with desc={mask['desc']!r}, not a brain mask (desc-brain)"))
        elif _space(mask) is not None and not targets:
            skipped.append(Skipped(mask["file"], f"brain mask in space {mask['space']!r}, not on the image's grid"))
        elif not targets:
            skipped.append(Skipped(mask["file"], "brain mask with no matching image (sub, ses, acq, ce, rec, run)"))
        elif all(id(t) in paired for t in targets):
            first = paired[id(targets[0])].name
            skipped.append(Skipped(mask["file"], f"another brain mask was paired first ({first})"))
        else:
            for target in targets:
                paired.setdefault(id(target), mask["file"])
    return paired
