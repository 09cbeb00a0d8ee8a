"""Copy a trained, calibrated bundle into phanes_cli/data/models/<name> as the model phanes ships.

Only the files the bundle's index covers are copied (no checkpoints); provenance.json gains the `data synth`
recipe of the training cohort (so `tests/test_shipped_model_figures.py` can rebuild its validation volumes and
check the recorded validation figures) and, when given, the commit the training ran from; the index is then
re-sealed (`core.bundle.write_provenance`). Weights, config and calibration are untouched, so the bundle's
content key (what screening resume keys on) is the trained bundle's.

Usage:
    python tools/ship_model.py runs/b23-h90-c1 phanes-cpu-2026-12c --healthy 30 --lesions 16 --seed 0 \
        --label-map-fraction 0 [--training-commit SHA]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from phanes_cli.core.bundle import INDEX_FILE, PROVENANCE_FILE, load_bundle, write_provenance
from phanes_cli.core.shipped_models import models_dir
from phanes_cli.synth.cohort import DEFAULT_TEST_SOURCES, DEFAULT_VAL_SOURCES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("name")
    parser.add_argument("--healthy", type=int, required=True)
    parser.add_argument("--lesions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--label-map-fraction", type=float, required=True)
    parser.add_argument("--training-commit", help="the commit the training ran from, when HEAD moved meanwhile")
    args = parser.parse_args()
    model = load_bundle(args.bundle)  # verified and calibrated
    target = models_dir() / args.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    listed = json.loads((args.bundle / INDEX_FILE).read_text())["files"]
    for name in listed:
        shutil.copy2(args.bundle / name, target / name)
    shutil.copy2(args.bundle / INDEX_FILE, target / INDEX_FILE)
    provenance = json.loads((target / PROVENANCE_FILE).read_text())
    provenance["cohort"]["synth"] = {"healthy": args.healthy, "lesions": args.lesions, "seed": args.seed,
                                     "label_map_fraction": args.label_map_fraction,
                                     "val_sources": list(DEFAULT_VAL_SOURCES),
                                     "test_sources": list(DEFAULT_TEST_SOURCES)}
    if args.training_commit:
        provenance["source"] = {"commit": args.training_commit, "uncommitted_changes": False,
                                "bundle_written_at": provenance.get("source")}
    digest = write_provenance(target, provenance)
    print(f"shipped {target} ({digest[:12]}), content key {model.content_key[:12]} unchanged: "
          f"{load_bundle(target).content_key == model.content_key}")


if __name__ == "__main__":
    main()
