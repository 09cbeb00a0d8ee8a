"""`phanes screen --layout bids`: OUT as a BIDS-derivatives dataset.

OUT gets `dataset_description.json` (DatasetType derivative, GeneratedBy phanes) and a `.bidsignore` for the
run's own files (tables, part files, run.json, reports); every map goes to
`sub-<label>/[ses-<label>/]anat/<source entities>_desc-{anomaly_map,lesion_mask,pseudohealthy_T1w}.nii.gz`
(`OutputLayout.map_path`) with a JSON sidecar naming its source image, the bundle hash and the thresholds.
The ids must be BIDS ids (`sub-<label>...`, as a BIDS root input gives them). The layout of an OUT is fixed
by its first run: resuming it with the other layout is refused rather than mixing the two.
"""

from __future__ import annotations

from pathlib import Path

from phanes_cli import __version__
from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import ConfigError
from phanes_cli.infra.atomic import write_bytes, write_json
from phanes_cli.screening.bids_naming import BIDS_DESCRIPTION, bids_stem
from phanes_cli.screening.layout import OutputLayout

LAYOUTS = ("default", "bids")
BIDS_VERSION = "1.9.0"
BIDSIGNORE = "maps/\nparts/\n*.parquet\nrun.json\nreport/\nreport.html\nstats/\n.phanes-screen.lock\n"
DESCRIPTIONS = {
    "anomaly": "PHANES anomaly map s(x) = |x_ph - x| * LPIPS(x_ph, x) within the brain, on the source image's grid",
    "lesion_mask": "PHANES lesion mask: the anomaly map at or above the calibrated anomaly threshold (1 = lesion)",
    "pseudohealthy": "PHANES pseudo-healthy image x_ph at the source image's intensities",
}


def check_layout(choice: str) -> str:
    if choice not in LAYOUTS:
        raise ConfigError(f"--layout {choice!r} is not one of {', '.join(LAYOUTS)}")
    return choice


def start_layout(layout: OutputLayout, choice: str, ids: list[str]) -> None:
    """Refuse a layout OUT was not started with or ids that are not BIDS; for bids, write the dataset files."""
    check_layout(choice)
    if layout.bids and choice != "bids":
        raise ConfigError(f"{layout.root}: holds a --layout bids run; resume it with --layout bids, or use another OUT")
    if choice != "bids":
        return
    if not layout.bids and any((layout.root / "parts" / "done").glob("*.json")):
        raise ConfigError(f"{layout.root}: has a default-layout run; resume without --layout bids or use another OUT")
    not_bids = [i for i in ids if not i.startswith("sub-")]
    if not_bids:
        raise ConfigError(f"--layout bids needs BIDS inputs (ids sub-<label>_...), as a BIDS root gives them; "
                          f"{not_bids[0]!r} is not one")
    stems: dict[str, str] = {}
    for vid in ids:
        other = stems.setdefault(bids_stem(vid), vid)
        if other != vid:
            raise ConfigError(f"--layout bids: {other!r} and {vid!r} would write the same files ({bids_stem(vid)}_...)")
    write_json(layout.root / BIDS_DESCRIPTION, {
        "Name": "phanes anomaly screening", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "phanes", "Version": __version__,
                         "Description": "PHANES pseudo-healthy generative networks (Bercea et al., MICCAI 2023)"}]})
    write_bytes(layout.root / ".bidsignore", BIDSIGNORE.encode())


def write_sidecar(map_path: Path, kind: str, source: Path, bundle_hash: str, calibration: Calibration) -> Path:
    """The JSON sidecar of one BIDS map: what it is, its source image, the model and the thresholds it used."""
    return write_json(map_path.with_name(map_path.name.removesuffix(".nii.gz") + ".json"), {
        "Description": DESCRIPTIONS[kind], "Sources": [str(source)], "BundleHash": bundle_hash,
        "Thresholds": calibration.to_dict()})
