"""`phanes bids BIDS_DIR OUTPUT_DIR participant|group`: the BIDS-Apps convention on top of `screen --layout bids`.

A runner may start the participant level once per subject, all at once, into the same OUTPUT_DIR, so no
participant writes a file another one writes too:

- participant (each `--participant-label`, default: every subject of BIDS_DIR): screens that subject's
  T1w images as `screen --layout bids` does, into its own run folder
  `OUTPUT_DIR/phanes-participants/sub-<label>/` (own lock, run.json, part files and tables), then publishes
  the subject's derivatives as `OUTPUT_DIR/sub-<label>/` (hard links, each file swapped in atomically). The
  dataset files (dataset_description.json, README, .bidsignore) are the same for every participant and written
  atomically;
- group: holding every participant's lock (a participant still running is refused), merges the participants'
  tables into `OUTPUT_DIR/volumes.parquet`, `lesions.parquet`, `failures.parquet` and a run.json (every
  participant must have used the same model and thresholds), writes the burden TSVs; the command then renders
  `OUTPUT_DIR/report.html`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phanes_cli.errors import ConfigError, InputError
from phanes_cli.infra.atomic import write_bytes, write_parquet
from phanes_cli.inputs.bids import BidsQuery, is_bids_root, select_bids
from phanes_cli.run_folder.bids_naming import BIDS_DESCRIPTION
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import TABLES
from phanes_cli.screening.bids_derivative import BIDSIGNORE, write_burden_tables
from phanes_cli.screening.engine import ScreenSummary, screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.run_log import now_iso, write_run_manifest
from phanes_cli.screening.session import run_lock

PARTICIPANTS = "phanes-participants"  # the participants' own run folders inside OUTPUT_DIR
DATASET_FILES = (BIDS_DESCRIPTION, "README.md")


def _root(bids_dir: Path) -> Path:
    if not is_bids_root(bids_dir):
        raise InputError(bids_dir, f"not a BIDS dataset (no {BIDS_DESCRIPTION})")
    return bids_dir


def participant_labels(bids_dir: Path, wanted: list[str], query: BidsQuery) -> list[str]:
    """The labels to screen: `wanted` (with or without 'sub-'), each checked against the dataset, else all."""
    rows = select_bids(_root(bids_dir), query.suffix, dict(query.filters)).rows
    present = sorted({str(r.extra["sub"]) for r in rows})
    if not wanted:
        if not present:
            raise InputError(bids_dir, f"holds no {query.suffix} images")
        return present
    labels = list(dict.fromkeys(label.removeprefix("sub-") for label in wanted))
    missing = [label for label in labels if label not in present]
    if missing:
        raise InputError(bids_dir, f"has no {query.suffix} image of participant(s) {', '.join(missing)}")
    return labels


def participant(bids_dir: Path, output_dir: Path, labels: list[str], options: ScreenOptions) -> list[ScreenSummary]:
    """Screen each participant into its own run folder and publish its derivatives (module docstring)."""
    summaries = []
    for label in participant_labels(bids_dir, labels, options.bids):
        run_dir = output_dir / PARTICIPANTS / f"sub-{label}"
        query = replace(options.bids, filters=(*options.bids.filters, ("sub", label)))
        run = replace(options, out=run_dir, layout="bids", bids=query, exclude=output_dir)
        summaries.append(screen([str(bids_dir)], run))
        _publish(run_dir, output_dir, label)
    return summaries


def _publish(run_dir: Path, output_dir: Path, label: str) -> None:
    """`run_dir/sub-<label>/` as `output_dir/sub-<label>/`, file by file (hard links, copies where links fail, each
    swapped in atomically; files the run no longer has removed), and the dataset files beside it. No folder is
    removed or renamed: a participant indexing the dataset meanwhile never sees one vanish."""
    source, target = run_dir / f"sub-{label}", output_dir / f"sub-{label}"
    fresh = set()
    for path in sorted(source.rglob("*")) if source.is_dir() else []:
        if path.is_file() and not path.name.startswith("."):
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            _place(path, destination)
            fresh.add(destination)
    for path in list(target.rglob("*")) if target.is_dir() else []:
        if path.is_file() and path not in fresh:
            path.unlink(missing_ok=True)
    for name in DATASET_FILES:
        write_bytes(output_dir / name, (run_dir / name).read_bytes())
    write_bytes(output_dir / ".bidsignore", "".join(f"{line}\n" for line in (*BIDSIGNORE, PARTICIPANTS)).encode())


def _place(source: Path, destination: Path) -> None:
    """`source` at `destination` through a temporary beside it: a hard link, or a copy where links fail."""
    temporary = destination.with_name(f".tmp-{destination.name}-{secrets.token_hex(4)}")
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copy2(source, temporary)
    os.replace(temporary, destination)


@dataclass(frozen=True)
class GroupResult:
    """What the group level merged: participants, volumes and failed volumes."""

    participants: list[str]
    volumes: int
    failed: int


def _participant_runs(output_dir: Path) -> list[OutputLayout]:
    runs = sorted(p for p in (output_dir / PARTICIPANTS).glob("sub-*") if p.is_dir())
    if not runs:
        raise InputError(output_dir, "holds no participant-level results; run `phanes bids BIDS_DIR OUTPUT_DIR "
                                     "participant` first")
    return [OutputLayout(p) for p in runs]


def _manifests(runs: list[OutputLayout]) -> list[dict[str, Any]]:
    """Each participant's run.json; one model and one set of thresholds across them, or a ConfigError."""
    manifests = []
    for run in runs:
        try:
            manifests.append(json.loads(run.run_manifest.read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(run.run_manifest, f"participant run record unreadable ({exc})") from None
    first = manifests[0]["bundle"]
    for run, manifest in zip(runs, manifests, strict=True):
        bundle = manifest.get("bundle", {})
        if [bundle.get(k) for k in ("content_key", "calibration")] != [first.get(k) for k in ("content_key",
                                                                                             "calibration")]:
            raise ConfigError(f"{run.root.name} was screened with another model or thresholds than "
                              f"{runs[0].root.name}; rerun the participant level of one of them with the same --bundle")
    return manifests


def group(output_dir: Path) -> GroupResult:
    """Merge the participants' tables and run records into OUTPUT_DIR (module docstring); refuses while a
    participant is running."""
    layout = OutputLayout(output_dir)
    runs = _participant_runs(output_dir)
    with contextlib.ExitStack() as locks:
        locks.enter_context(run_lock(layout))
        for run in runs:
            locks.enter_context(run_lock(run))
        manifests = _manifests(runs)
        for name in TABLES:
            parts = [pq.read_table(run.table(name)) for run in runs if run.table(name).is_file()]
            merged = pa.concat_tables(parts, promote_options="permissive") if parts else TABLES[name].empty_table()
            merged = merged.take(pc.sort_indices(merged, [("id", "ascending")]))
            metadata = parts[0].schema.metadata if parts else None  # the thresholds consolidate recorded
            write_parquet(layout.table(name), merged.replace_schema_metadata(metadata))
        counts = {key: sum(int(m.get("counts", {}).get(key) or 0) for m in manifests)
                  for key in ("total", "done", "failed", "skipped")}
        write_run_manifest(layout.run_manifest, {
            "status": "finished", "level": "group", "started": min(str(m.get("started")) for m in manifests),
            "finished": now_iso(), "bundle": manifests[0]["bundle"], "counts": counts,
            "participants": {run.root.name: {k: m.get(k) for k in ("run_id", "status", "started", "finished",
                                                                   "counts")}
                             for run, m in zip(runs, manifests, strict=True)}})
        write_burden_tables(layout)
    volumes = pq.read_table(layout.table("volumes"), columns=["status"]).column("status").to_pylist()
    return GroupResult([run.root.name for run in runs], len(volumes), sum(s != "ok" for s in volumes))
