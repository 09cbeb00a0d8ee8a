"""Where a screening run puts things: every writer and reader of OUT goes through `OutputLayout`.

Layout of OUT:
    maps/<id>_anomaly.nii.gz, maps/<id>_lesionmask.nii.gz, maps/<id>_pseudohealthy.nii.gz
        (`_lesionmask`, not `_mask`: HD-BET and FSL name brain masks `_mask`)
    maps/<id>_brainmask.nii.gz   the brain mask the volume was screened in (every run; its source and path are
                                 the volume row's brain_mask_source and brain_mask_path)
    parts/volumes/<id>.parquet   one row, written when the volume is committed
    parts/lesions/<id>.parquet   its lesions (possibly zero rows)
    parts/failures/<id>.parquet  one row when the volume failed
    parts/done/<id>.json         the commit marker, written last (`commit`)
    volumes.parquet, lesions.parquet, failures.parquet   consolidated, sorted by id (`consolidate`)
    run.json                     the run manifest
<id> in a file name is `file_stem(id)`: the id itself, or for ids that start with '.' or are over-long a
shortened, hashed form (the tables keep the full id). With `--layout bids` the maps follow `bids_naming`,
each with a JSON sidecar, and the brain mask is `desc-brain_mask`; there is no maps/ folder. Every id
passes `infra.folders.check_id` (input ids, and ids read back from a run's tables, which may come from
anyone), and every path this layout hands out is checked by `inside` to resolve within OUT, links included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from phanes_cli.errors import InputError
from phanes_cli.infra.folders import check_id, inside
from phanes_cli.run_folder.bids_naming import BIDS_DESCRIPTION, BIDS_MAP_NAMES, bids_folder, bids_stem
from phanes_cli.run_folder.schemas import TABLES

OUTPUT_KINDS = ("anomaly", "lesion_mask", "pseudohealthy")

MAP_SUFFIX = {"anomaly": "anomaly", "lesion_mask": "lesionmask", "pseudohealthy": "pseudohealthy",
              "brain_mask": "brainmask"}  # file name per kind (the brain mask is written for every volume)

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

def check_stems(ids: Iterable[str], source: object = "ids") -> None:
    """Every id valid and no two ids sharing one file name (a long id's hashed stem can equal a short id)."""
    seen: dict[str, str] = {}
    for vid in ids:
        stem = file_stem(check_id(vid, source))
        other = seen.setdefault(stem, vid)
        if other != vid:
            raise InputError(str(source), f"ids {other[:200]!r} and {vid[:200]!r} would share the file name "
                                          f"{stem!r}; rename one")

@dataclass(frozen=True)
class OutputLayout:
    """Paths inside OUT; every writer and reader of a run goes through here."""

    root: Path

    @property
    def maps(self) -> Path:
        return self.root / "maps"

    def part(self, table: str, vid: str) -> Path:
        return inside(self.root, self.root / "parts" / table / f"{file_stem(check_id(vid))}.parquet")

    def done_marker(self, vid: str) -> Path:
        return inside(self.root, self.root / "parts" / "done" / f"{file_stem(check_id(vid))}.json")

    @property
    def bids(self) -> bool:
        """True for a `--layout bids` run (OUT holds a dataset_description.json)."""
        return (self.root / BIDS_DESCRIPTION).is_file()

    def map_path(self, vid: str, kind: str) -> Path:
        check_id(vid)
        if self.bids:
            return inside(self.root, bids_folder(self.root, vid) / f"{bids_stem(vid)}_{BIDS_MAP_NAMES[kind]}.nii.gz")
        return inside(self.root, self.maps / f"{file_stem(vid)}_{MAP_SUFFIX[kind]}.nii.gz")

    def sidecar(self, vid: str, kind: str) -> Path:
        """The JSON sidecar of a `--layout bids` map."""
        path = self.map_path(vid, kind)
        return path.with_name(path.name.removesuffix(".nii.gz") + ".json")

    def brain_mask_files(self, vid: str) -> list[Path]:
        """The brain mask a volume was screened in, and with `--layout bids` its sidecar."""
        mask = self.map_path(vid, "brain_mask")
        return [mask, self.sidecar(vid, "brain_mask")] if self.bids else [mask]

    def relative(self, path: Path) -> str:
        """`path` relative to OUT, '/'-separated: what the tables record, so a moved run still finds its files."""
        return path.relative_to(self.root).as_posix()

    def table(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    @property
    def run_manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".phanes-screen.lock"

    def ensure(self) -> None:
        """Create the folders a run writes into (maps/ only for the default layout)."""
        for sub in ("parts/volumes", "parts/lesions", "parts/failures", "parts/done"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not self.bids:
            self.maps.mkdir(exist_ok=True)

    def clear(self, vid: str) -> None:
        """Remove every output of one id (for --overwrite and before a failure is recorded)."""
        paths = [self.map_path(vid, k) for k in OUTPUT_KINDS]
        paths += [p.with_name(p.name.removesuffix(".nii.gz") + ".json") for p in paths]  # BIDS sidecars
        paths += [*self.brain_mask_files(vid), self.done_marker(vid), *(self.part(t, vid) for t in TABLES)]
        for path in paths:
            path.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Delete temp files a killed run left behind (only safe while holding the run lock)."""
        for folder in (self.maps, *(self.root / "parts" / t for t in (*TABLES, "done"))):
            if folder.is_dir():
                for path in folder.glob(".tmp-*"):
                    path.unlink(missing_ok=True)
        for path in self.root.glob("sub-*/**/.tmp-*"):  # --layout bids maps
            path.unlink(missing_ok=True)
