"""`phanes screen --layout bids`: OUT as a BIDS-derivatives dataset that passes the BIDS validator.

OUT gets `dataset_description.json` (DatasetType derivative, GeneratedBy phanes, `SourceDatasets` and a
`DatasetLinks` alias `raw` for the input dataset), a README and a `.bidsignore` for what BIDS has no name
for (patterns without a trailing slash: the validator does not honour those). Per volume, in
`sub-<label>/[ses-<label>/]anat/` (`OutputLayout.map_path`):

- `<entities>_desc-lesion_mask.nii.gz` (sidecar `Type: Lesion`, `SpatialReference` and `Sources` as
  `bids:raw:` URIs of the input image);
- `<entities>_desc-brain_mask.nii.gz`, the brain mask the volume was screened in (`Type: Brain`, and
  `BrainMaskSource`: file, model or threshold);
- `<entities>_desc-pseudohealthy_T1w.nii.gz` (`SkullStripped`: whether skull lies outside the brain mask);
- `<entities>_desc-anomaly_map.nii.gz`: a score, not a probability, so not a BIDS `probseg`; listed in
  `.bidsignore` (BIDS 1.9 has no suffix for a statistical map of an anatomical image);
- `<sub>[_<ses>]_burden.tsv`: the folder's volumes, one row each, with their burden statistics (ignored too);
  a subject with sessions also gets `sub-<label>/sub-<label>_burden.tsv` with every session's rows.

Every sidecar names the bundle hash and the thresholds. The ids must be BIDS ids (`sub-<label>...`, as a BIDS
root input gives them). The layout of an OUT is fixed by its first run: resuming it with the other layout
is refused rather than mixing the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.statistics import SIZE_BIN_COLUMNS
from phanes_cli.errors import ConfigError
from phanes_cli.infra.atomic import write_bytes, write_json
from phanes_cli.infra.versions import __version__
from phanes_cli.run_folder.bids_naming import BIDS_DESCRIPTION, BURDEN_SUFFIX, bids_stem, burden_paths
from phanes_cli.run_folder.layout import OutputLayout

LAYOUTS = ("default", "bids")
BIDS_VERSION = "1.9.0"
BIDSIGNORE = ["parts", "maps", "*.parquet", "run.json", "report", "report.html", "stats", ".phanes-screen.lock",
              "*_desc-anomaly_map.nii.gz", "*_desc-anomaly_map.json", f"*_{BURDEN_SUFFIX}"]
DESCRIPTIONS = {
    "anomaly": "PHANES anomaly map s(x) = |x_ph - x| * LPIPS(x_ph, x) within the brain, on the source image's grid",
    "lesion_mask": "PHANES lesion mask: the anomaly map at or above the calibrated anomaly threshold (1 = lesion)",
    "pseudohealthy": "PHANES pseudo-healthy image x_ph at the source image's intensities",
    "brain_mask": "The brain mask PHANES screened the image in (BrainMaskSource: file = given with the image, "
                  "model = deepbet brain extraction, threshold = the non-zero voxels of a skull-stripped image)",
}
MASK_TYPES = {"lesion_mask": "Lesion", "brain_mask": "Brain"}
BURDEN_COLUMNS = ("id", "status", "brain_mask_source", "brain_volume_ml", "lesion_burden_ml", "lesion_burden_fraction",
                  "lesion_count", *SIZE_BIN_COLUMNS, "largest_lesion_ml", "max_anomaly", "mean_anomaly",
                  "anomaly_threshold", "min_lesion_ml")
README = """# PHANES anomaly screening

BIDS-derivatives dataset written by `phanes screen --layout bids` (phanes {version}) from the dataset(s)
named in dataset_description.json (SourceDatasets, DatasetLinks). Per image, in sub-<label>/[ses-<label>/]anat:
the lesion mask (desc-lesion_mask), the brain mask it was screened in (desc-brain_mask), the anomaly map
(desc-anomaly_map; a score, listed in .bidsignore), with --pseudo-healthy the pseudo-healthy image
(desc-pseudohealthy_T1w), and <sub>[_<ses>]_burden.tsv with the burden statistics of the folder's images.
Each sidecar names its source image, the model bundle's hash and the thresholds. The tables of the whole run
(volumes.parquet, lesions.parquet, failures.parquet) and run.json are at the top; see the phanes README.
"""


def check_layout(choice: str) -> str:
    if choice not in LAYOUTS:
        raise ConfigError(f"--layout {choice!r} is not one of {', '.join(LAYOUTS)}")
    return choice


def _check_ids(ids: list[str]) -> None:
    """BIDS ids only, and no two that would write the same files."""
    not_bids = [i for i in ids if not i.startswith("sub-")]
    if not_bids:
        raise ConfigError(f"--layout bids needs BIDS inputs (ids sub-<label>_...), as a BIDS root gives them; "
                          f"{not_bids[0]!r} is not one")
    stems: dict[str, str] = {}
    for vid in ids:
        other = stems.setdefault(bids_stem(vid), vid)
        if other != vid:
            raise ConfigError(f"--layout bids: {other!r} and {vid!r} would write the same files ({bids_stem(vid)}_...)")


def _links(roots: list[Path]) -> dict[str, str]:
    """DatasetLinks aliases of the input datasets: raw, then raw2, raw3... in input order."""
    return {("raw" if n == 1 else f"raw{n}"): root.absolute().as_uri() for n, root in enumerate(roots, start=1)}


def start_layout(layout: OutputLayout, choice: str, ids: list[str], roots: list[Path] | None = None) -> None:
    """Refuse a layout OUT was not started with or ids that are not BIDS; for bids, write the dataset files.

    `roots`: the BIDS datasets the images come from (SourceDatasets; `bids:raw:` URIs point into them).
    """
    check_layout(choice)
    if layout.bids and choice != "bids":
        raise ConfigError(f"{layout.root}: holds a --layout bids run; resume it with --layout bids, or use another OUT")
    if choice != "bids":
        return
    if not layout.bids and any((layout.root / "parts" / "done").glob("[!.]*.json")):
        raise ConfigError(f"{layout.root}: has a default-layout run; resume without --layout bids or use another OUT")
    _check_ids(ids)
    links = _links(roots or [])
    write_json(layout.root / BIDS_DESCRIPTION, {
        "Name": "phanes anomaly screening", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "phanes", "Version": __version__,
                         "Description": "PHANES pseudo-healthy generative networks (Bercea et al., MICCAI 2023)"}],
        "SourceDatasets": [{"URL": url} for url in links.values()], "DatasetLinks": links})
    write_bytes(layout.root / ".bidsignore", "".join(f"{line}\n" for line in BIDSIGNORE).encode())
    write_bytes(layout.root / "README.md", README.format(version=__version__).encode())


def source_uri(root: Path, image: Path) -> str:
    """`bids:<alias>:<path>` of an input file inside a linked dataset, else its `file://` URI."""
    try:
        links = json.loads((root / BIDS_DESCRIPTION).read_text()).get("DatasetLinks", {})
    except (OSError, json.JSONDecodeError):
        links = {}
    for alias, url in links.items():
        folder = Path(unquote(urlparse(url).path))
        if image.absolute().is_relative_to(folder):
            return f"bids:{alias}:{image.absolute().relative_to(folder).as_posix()}"
    return image.absolute().as_uri()


def write_sidecar(layout: OutputLayout, vid: str, kind: str, sources: list[Path], bundle_hash: str,
                  calibration: Calibration, derived: tuple[str, ...] = (), **fields: Any) -> Path:
    """The JSON sidecar of one BIDS map: what it is, its sources (input files, then the `derived` maps of
    this volume it was computed from, as `bids::` URIs), the model and thresholds; `fields` added."""
    uris = [source_uri(layout.root, path) for path in sources]
    uris += [f"bids::{layout.map_path(vid, k).relative_to(layout.root).as_posix()}" for k in derived]
    payload: dict[str, Any] = {"Description": DESCRIPTIONS[kind], "Sources": uris}
    if kind in MASK_TYPES:
        payload.update(Type=MASK_TYPES[kind], SpatialReference=uris[0])
    payload.update(BundleHash=bundle_hash, Thresholds=calibration.to_dict(), **fields)
    return write_json(layout.sidecar(vid, kind), payload)


def write_burden_tables(layout: OutputLayout) -> list[Path]:
    """`<sub>[_<ses>]_burden.tsv` in every anat folder of the run, and `<sub>_burden.tsv` in the folder of a
    subject with sessions (all its sessions), from the run's volumes table (`n/a` for nulls)."""
    if not layout.bids or not layout.table("volumes").is_file():
        return []
    volumes = pq.read_table(layout.table("volumes"), columns=list(BURDEN_COLUMNS))
    tables: dict[Path, list[int]] = {}
    for index, vid in enumerate(volumes.column("id").to_pylist()):
        if isinstance(vid, str) and vid.startswith("sub-"):
            for path in burden_paths(layout.root, vid):
                tables.setdefault(path, []).append(index)
    written = []
    options = pacsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False)
    for path, rows in sorted(tables.items()):
        sink = pa.BufferOutputStream()
        pacsv.write_csv(volumes.take(pa.array(rows)), sink, options)
        text = sink.getvalue().to_pybytes().decode()  # unquoted: nulls are empty cells, BIDS writes n/a
        lines = ["\t".join(BURDEN_COLUMNS)]
        lines += ["\t".join("n/a" if cell == "" else cell for cell in line.split("\t")) for line in text.splitlines()]
        path.parent.mkdir(parents=True, exist_ok=True)  # a folder of failed volumes only has no maps
        written.append(write_bytes(path, ("\n".join(lines) + "\n").encode()))
    return written
