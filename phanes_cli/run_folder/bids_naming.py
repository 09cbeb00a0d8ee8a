"""BIDS names of a `--layout bids` run: the dataset marker, the map names and each id's folder and stem.

Maps go to sub-<label>/[ses-<label>/]anat/<source entities>_<name>.nii.gz (`layout.OutputLayout.map_path`);
`bids_derivative` writes the dataset files and sidecars.
"""

from __future__ import annotations

from pathlib import Path

# `--layout bids`: OUT is a BIDS-derivatives dataset (its dataset_description.json says so, and every reader of
# OUT follows it); maps go to sub-<label>/[ses-<label>/]anat/<source entities>_<name>.nii.gz (`bids_derivative`).
BIDS_DESCRIPTION = "dataset_description.json"
BIDS_MAP_NAMES = {"anomaly": "desc-anomaly_map", "lesion_mask": "desc-lesion_mask",
                  "pseudohealthy": "desc-pseudohealthy_T1w", "brain_mask": "desc-brain_mask"}

BURDEN_SUFFIX = "burden.tsv"  # sub-<label>[_ses-<label>]_burden.tsv: the folder's volumes, one row each

def bids_stem(vid: str) -> str:
    """A BIDS volume id (`sub-01_ses-2_desc-brain`) without its desc entity: the outputs add their own."""
    return "_".join(part for part in vid.split("_") if not part.startswith("desc-"))

def bids_folder(root: Path, vid: str) -> Path:
    """OUT/sub-<label>/[ses-<label>/]anat for a BIDS id (ids are checked to start with sub-<label> first)."""
    entities = dict(part.split("-", 1) for part in vid.split("_") if "-" in part)
    folder = root / f"sub-{entities['sub']}"
    return (folder / f"ses-{entities['ses']}" if "ses" in entities else folder) / "anat"

def burden_paths(root: Path, vid: str) -> list[Path]:
    """The burden tables a BIDS id's row goes to: its anat folder's, and with sessions its subject's too."""
    entities = dict(part.split("-", 1) for part in vid.split("_") if "-" in part)
    subject = f"sub-{entities['sub']}"
    if "ses" not in entities:
        return [root / subject / "anat" / f"{subject}_{BURDEN_SUFFIX}"]
    session = f"ses-{entities['ses']}"
    return [root / subject / session / "anat" / f"{subject}_{session}_{BURDEN_SUFFIX}",
            root / subject / f"{subject}_{BURDEN_SUFFIX}"]
