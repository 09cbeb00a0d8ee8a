"""Site calibration, measured (issue 20): `phanes calibrate` on N healthy controls of one scanner/preparation.

A user whose brains are prepared differently from the bundle's validation brains (FreeSurfer `norm`, N4 and
registration, another scanner) can recalibrate the operating point on a few healthy controls of their own:
`phanes calibrate --bundle COPY --data MANIFEST` where MANIFEST's `val` rows are those controls (with
`tune.enabled` the real lesion shapes are inserted into them, as for the bundle's own validation). This script
measures what that buys on one source brain: false-positive mL on held-out controls of that source with the
bundle as shipped, then after calibrating copies of it on N = 1, 2, 4 controls.

The controls are subjects synthesised from the one source brain (`data synth` with it as the only validation
source): the same person with the subject and scan variation of `synth.variation` (intensity field, noise,
resolution, small deformations), i.e. augmented controls, not other people; the held-out controls are the
remaining subjects of that source. The source is chosen by the user: for the figures in docs/measurements.md it is a
*test* brain (FreeSurfer `norm`), on purpose: these figures are reported apart from the test figures.

Usage:
    python benchmarks/site_calibration.py --bundle runs/b20-f0.5 --source niivue_fs_norm_T1 \
        --work runs/site-fsnorm [--counts 1,2,4] [--healthy 40]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from phanes_cli.calibrate.run import calibrate
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.components import label_components
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import run_volume
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.cohort import synth_cohort
from phanes_cli.synth.options import SynthOptions


def site_controls(work: Path, source: str, healthy: int) -> list[ManifestRow]:
    """Healthy subjects of `source` (its only split: val), synthesised once into `work`/cohort."""
    manifest = work / "cohort" / "manifest.parquet"
    if not manifest.exists():
        others = ("niimath_adult_T1",) if source != "niimath_adult_T1" else ("niivue_fs_norm_T1",)
        synth_cohort(SynthOptions(work / "cohort", healthy, 0, val_sources=(source,), test_sources=others))
    return [r for r in read_manifest(manifest) if r.split == "val"]


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
    shutil.copytree(bundle, copy)
    manifest = write_manifest(controls, work / f"site-n{len(controls)}.parquet")
    start = time.perf_counter()
    calibrate(copy, manifest, device="cpu", progress=False)
    return copy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--healthy", type=int, default=40)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    controls = site_controls(args.work, args.source, args.healthy)
    held_out = controls[max(counts):]
    if len(held_out) < 2:
        raise SystemExit(f"{len(controls)} controls of {args.source}: raise --healthy to keep at least 2 held out")
    print(f"{args.source}: {len(controls)} controls, {len(held_out)} held out: {[r.id for r in held_out]}")
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
