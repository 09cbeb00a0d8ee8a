"""Copy a trained, calibrated bundle into phanes_cli/data/models/<name> as the model phanes ships.

Only the files the bundle's index covers are copied (no checkpoints); provenance.json gains the `data synth`
recipe of the training cohort (so `tests/test_shipped_model_figures.py` can rebuild its validation volumes and
check the recorded validation figures) and, when given, the commit the training ran from; the index is then
re-sealed (`core.bundle.write_provenance`), all in a temporary folder then copied into place (phanes itself
never writes inside the models folder: `core.bundle.check_writable`). Weights, config and calibration are
untouched, so the bundle's content key (what screening resume keys on) is the trained bundle's.

Usage:
    python tools/ship_model.py runs/b23-h90-c1 phanes-cpu-2026-12c --healthy 30 --lesions 16 --seed 0 \
        --label-map-fraction 0 [--training-commit SHA]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import PROVENANCE_FILE, copy_bundle, load_bundle, write_provenance
from phanes_cli.core.shipped_models import models_dir
from phanes_cli.inputs.manifest import read_manifest

SOURCES = {
    "IXI-HH": "IXI dataset (brain-development.org, Imperial College London), CC BY-SA 3.0; 2 mm resampling, brain "
              "masks and DLMUSE parcellations from CBICA/NiChart_Project test data",
    "ds002748": "OpenNeuro ds002748 (Bezmaternykh et al.), CC0, as prepared in aaronsossin/DepressionMRI_AI",
    "stroke lesion shapes (tuning)": "Stroke Outcome Optimization Project (OpenNeuro ds004889), BSD-2-Clause",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("name")
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest the bundle was trained on")
    parser.add_argument("--val-per-site", type=int, required=True)
    parser.add_argument("--test-ixi", type=int, required=True)
    parser.add_argument("--test-ds", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--training-commit", help="the commit the training ran from, when HEAD moved meanwhile")
    args = parser.parse_args()
    model = load_bundle(args.bundle)  # verified and calibrated
    target = models_dir() / args.name
    with tempfile.TemporaryDirectory(prefix="phanes-ship-") as tmp:  # phanes never writes inside the models folder
        staged = Path(tmp) / args.name
        copy_bundle(args.bundle, staged)
        digest = write_provenance(staged, _provenance(staged, args))
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(staged, target)
    print(f"shipped {target} ({digest[:12]}), content key {model.content_key[:12]} unchanged: "
          f"{load_bundle(target).content_key == model.content_key}")


def _provenance(staged: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The bundle's provenance with the cohort recipe (and the training commit, when given) added."""
    provenance: dict[str, Any] = json.loads((staged / PROVENANCE_FILE).read_text())
    provenance["cohort"]["recipe"] = {"tool": "tools/real_cohort.py", "val_per_site": args.val_per_site,
                                      "test_ixi": args.test_ixi, "test_ds": args.test_ds, "seed": args.seed}
    provenance["cohort"]["data_sources"] = SOURCES
    rows = read_manifest(args.manifest)
    for split in ("train", "val", "test"):
        chosen = [r for r in rows if r.split == split]
        provenance["cohort"][split] = {"volumes": len(chosen),
                                       "sources": dict(Counter(str(r.extra.get("site")) for r in chosen))}
    if args.training_commit:
        provenance["source"] = {"commit": args.training_commit, "uncommitted_changes": False,
                                "bundle_written_at": provenance.get("source")}
    return provenance


if __name__ == "__main__":
    main()
