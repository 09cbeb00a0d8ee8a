"""Would more training steps help? Validation Dice and healthy false lesion volume against training steps.

A run trained with `train.snapshot_every` keeps each stage's weights every N steps
(`checkpoints/stage<n>_step<k>.safetensors`). Every snapshot becomes a bundle: stage 1 snapshots with the run's
final stage 2, stage 2 snapshots with its final stage 1. Each is tuned as `phanes calibrate --tune` tunes
(real stroke shapes inserted into the manifest's validation brains, healthy false-positive budget), at one mask
percentile (the final model's, so a point costs one pipeline pass over the validation brains), and the table gives
the tuned validation Dice, lesion recall and, per site, the median healthy false lesion volume at that operating
point. Validation brains only: never a test split.

Usage:
    python benchmarks/learning_curve.py RUN --manifest runs/real/manifest.parquet --work runs/real/curve
(RUN: the folder `phanes train --out` wrote, with its checkpoints/; calibrated, its tuned mask percentile is reused
unless --mask-percentile gives one)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.runtimes.pytorch import load_networks
from phanes_cli.training.checkpoint import CHECKPOINT_DIR, module_state

SNAPSHOT = re.compile(r"stage([12])_step(\d+)\.safetensors")


def snapshots(run: Path) -> list[tuple[int, int, Path]]:
    """(stage, step, file) of every snapshot in the run, by stage then step."""
    found = [(int(m[1]), int(m[2]), p) for p in (run / CHECKPOINT_DIR).glob("stage*_step*.safetensors")
             if (m := SNAPSHOT.fullmatch(p.name))]
    return sorted(found)


def point_bundle(run: Path, stage: int, weights: Path | None, out: Path, mask_percentile: float) -> Path:
    """The run's bundle with one stage's weights from a snapshot, tuned at one mask percentile only."""
    model = load_bundle(run, require_calibration=False)
    nets = load_networks(model)
    if weights is not None:
        name, module = ("ra", nets.ra) if stage == 1 else ("generator", nets.generator)
        module.load_state_dict(module_state(name, load_file(str(weights))))
    config = replace(model.config, tune=replace(model.config.tune, mask_percentiles=(mask_percentile,)))
    save_bundle(out, config, nets.ra, nets.generator)
    return out


def tuned_figures(bundle: Path, manifest: Path) -> dict[str, Any]:
    """Tune the bundle through the CLI and read the figures its calibration records."""
    phanes = Path(sys.executable).parent / "phanes"  # the CLI installed beside this interpreter
    subprocess.run([str(phanes), "calibrate", "--bundle", str(bundle), "--data", str(manifest), "--tune"], check=True,
                   stdout=subprocess.DEVNULL)
    tuning = json.loads((bundle / "calibration.json").read_text())["tuning"]
    healthy = tuning["healthy_validation"]
    per_site: dict[str, list[float]] = {}
    for volume, ml in zip(healthy["volumes"], healthy["fp_ml"], strict=True):
        per_site.setdefault(volume.split("-")[0], []).append(ml)
    return {"dice": tuning["validation"]["dice"], "recall": tuning["validation"]["lesion_recall"],
            "burden_error": tuning["validation"]["median_abs_burden_error_ml"],
            "fp_ml": {site: statistics.median(v) for site, v in sorted(per_site.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mask-percentile", type=float, help="default: the calibrated RUN's tuned percentile")
    args = parser.parse_args()
    percentile = args.mask_percentile
    if percentile is None:
        final = load_bundle(args.run).require_calibration()
        percentile = float(final.tuning["mask_percentile"]) if final.tuning else 99.0
    points: list[tuple[int, int, Path | None]] = [(s, k, p) for s, k, p in snapshots(args.run)]
    last = {s: max((k for t, k, _ in points if t == s), default=0) for s in (1, 2)}
    steps = json.loads((args.run / "versions.json").read_text())["training"]["stages"]
    for record in steps:  # the final weights are the last point of each stage's curve
        if record["stage"] in (1, 2) and record["steps"] > last[record["stage"]]:
            points.append((record["stage"], record["steps"], None))
    rows = []
    for stage, step, weights in sorted(points, key=lambda p: (p[0], p[1])):
        out = args.work / f"stage{stage}_step{step:06d}"
        figures = tuned_figures(point_bundle(args.run, stage, weights, out, percentile), args.manifest)
        rows.append((stage, step, figures))
        print(f"stage {stage} step {step}: {figures}", flush=True)
    sites = sorted({s for _, _, f in rows for s in f["fp_ml"]})
    print(f"\nmask percentile {percentile:g}; the other stage at its final weights; validation brains only")
    print(f"{'stage':>5} {'step':>6} {'Dice':>6} {'recall':>7} {'|err| mL':>9} "
          + " ".join(f"{'FP ' + s:>14}" for s in sites))
    for stage, step, f in rows:
        print(f"{stage:>5} {step:>6} {f['dice']:6.3f} {f['recall']:7.3f} {f['burden_error']:9.1f} "
              + " ".join(f"{f['fp_ml'].get(s, float('nan')):14.2f}" for s in sites))


if __name__ == "__main__":
    main()
