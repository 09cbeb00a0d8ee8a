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
from pathlib import Path
from typing import Any

from phanes_cli.core.bundle import PROVENANCE_FILE, copy_bundle, load_bundle, write_provenance
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
    provenance["cohort"]["synth"] = {"healthy": args.healthy, "lesions": args.lesions, "seed": args.seed,
                                     "label_map_fraction": args.label_map_fraction,
                                     "val_sources": list(DEFAULT_VAL_SOURCES),
                                     "test_sources": list(DEFAULT_TEST_SOURCES)}
    if args.training_commit:
        provenance["source"] = {"commit": args.training_commit, "uncommitted_changes": False,
                                "bundle_written_at": provenance.get("source")}
    return provenance


if __name__ == "__main__":
    main()
