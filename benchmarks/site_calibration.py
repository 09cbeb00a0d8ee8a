"""Site calibration, measured: `phanes calibrate --out` on N healthy controls of one site.

A user whose brains come from another scanner or preparation than the bundle's validation brains can recalibrate
the operating point on a few healthy controls of their own: `phanes calibrate --out NEW --data MANIFEST` where
MANIFEST's `val` rows are those controls (with `tune.enabled` the real lesion shapes are inserted into them, as for
the bundle's own validation). This script measures what that buys: false-positive mL on held-out controls of the
site with the bundle as shipped, then after calibrating copies of it on the first N = 2, 4 controls.

The controls are the rows of one site and split of a manifest (`tools/real_cohort.py`); figures computed on test
rows are reported apart from the test figures, as a separate experiment.

Usage:
    python benchmarks/site_calibration.py --bundle B --manifest runs/real/manifest.parquet --site ds002748 \
        --split test --work runs/site-ds [--counts 2,4]
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.components import label_components
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import run_volume
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend


def site_controls(manifest: Path, site: str, split: str) -> list[ManifestRow]:
    """The healthy rows of one site and split, as validation rows (what calibrate reads)."""
    return [replace(r, split="val") for r in read_manifest(manifest)
            if r.extra.get("site") == site and r.split == split and r.kind == "healthy"]


def false_positives(bundle: Path, rows: list[ManifestRow]) -> tuple[list[float], list[int]]:
    """Lesion mL and components per healthy row with the bundle's calibration (every lesion voxel is false)."""
    model = load_bundle(bundle)
    backend = choose_backend("torch", model, select_device("cpu"), None)
    assert model.calibration is not None  # load_bundle requires it
    rule = LesionRule.from_calibration(model.calibration)
    threshold = model.calibration.mask_threshold
    ml, count = [], []
    for row in rows:
        volume, brain, _ = load_with_brain(row.image, row.brain_mask)
        maps = run_volume(volume.data, brain, volume.zooms, backend, model.config, threshold, keep=())
        mask = rule.apply(maps.anomaly, brain, volume.voxel_ml)
        ml.append(float(mask.sum()) * volume.voxel_ml)
        count.append(label_components(mask)[1] if mask.any() else 0)
    return ml, count


def recalibrated(bundle: Path, controls: list[ManifestRow], work: Path) -> tuple[Path, float]:
    """A copy of the bundle calibrated on `controls` (as its val split); returns it and the seconds it took."""
    copy = work / f"bundle-n{len(controls)}"
    if copy.exists():
        shutil.rmtree(copy)
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(controls, work / f"site-n{len(controls)}.parquet")
    start = time.perf_counter()
    calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", progress=False, out=copy))
    return copy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--counts", default="2,4")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    controls = site_controls(args.manifest, args.site, args.split)
    held_out = controls[max(counts):]
    if len(held_out) < 2:
        raise SystemExit(f"{len(controls)} controls of {args.site}: too few to keep at least 2 held out")
    print(f"{args.site}: {len(controls)} controls, {len(held_out)} held out: {[r.id for r in held_out]}")
    print(f"{'calibration':24}{'seconds':>8}{'FP mL median':>14}{'FP mL each':>30}{'comp median':>13}  budget met")
    rows = [("bundle as trained", args.bundle, 0.0)]
    for n in counts:
        copy, seconds = recalibrated(args.bundle, controls[:n], args.work)
        rows.append((f"site calibration, N={n}", copy, seconds))
    for name, bundle, seconds in rows:
        ml, count = false_positives(bundle, held_out)
        calibration = load_bundle(bundle).calibration
        met = ((calibration.tuning if calibration else None) or {}).get("budget_met")
        each = " ".join(f"{v:.1f}" for v in ml)
        print(f"{name:24}{seconds:>8.0f}{np.median(ml):>14.1f}{each:>30}{np.median(count):>13.1f}  {met}")


if __name__ == "__main__":
    main()
