"""A model on the real test brains of the real-cohort manifest (`tools/real_cohort.py`), reported per site.

- Healthy brains: every test row as it is; false lesion volume (mL) and components per brain (median, 90th
  percentile) and, on IXI brains (whose DLMUSE parcellation labels the ventricles), the false lesion volume
  inside the ventricles.
- Inserted real lesions: two real stroke shapes (the shipped bank) inserted into the first test brains of each
  site (`--lesioned`), scored like `phanes evaluate` (pixel AUPRC, [Dice], lesion recall by size, burden error)
  for PHANES and its stage 1 alone (RA).
The held-out sites (no training or validation subject comes from them) are reported on their own and pooled.
Nothing here chooses a setting: the operating point is the bundle's, calibrated on the validation split.

Usage:
    python benchmarks/real_cohort_eval.py runs/real/manifest.parquet --bundle B --out runs/real/eval [--lesioned 8]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from phanes_cli.calibrate.insertion import insert_lesion
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.components import label_components
from phanes_cli.core.volume_io import load_volume
from phanes_cli.evaluation.evaluate import Scoreboard, evaluate_volume
from phanes_cli.evaluation.methods import predict
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152

METHODS = ("phanes", "ra")
VENTRICLE_LABELS = (4, 11, 49, 50, 51, 52)  # MUSE: 3rd, 4th, inferior lateral and lateral ventricles
TRAINING_SITES = ("IXI-HH", "ds002748")


def lesioned_row(row: ManifestRow, folder: Path, seed: int) -> ManifestRow:
    """Two real stroke shapes inserted into a test brain, written with the brain mask used and the truth."""
    volume, brain, _ = load_with_brain(row.image, row.brain_mask)
    image, truth = insert_lesion(volume.data, brain, volume.affine, npz_bank(), load_mni152(),
                                 np.random.default_rng([seed, 7]), 2)
    paths = {}
    for name, array, dtype in (("t1", image, np.float32), ("brain", brain, np.uint8), ("lesion", truth, np.uint8)):
        paths[name] = folder / f"{row.id}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(array.astype(dtype), volume.affine), str(paths[name]))
    return ManifestRow(id=f"{row.id}+lesions", image=paths["t1"], brain_mask=paths["brain"],
                       lesion_mask=paths["lesion"], split="test", kind="lesion",
                       lesion_ml=float(truth.sum()) * volume.voxel_ml, extra=dict(row.extra))


def ventricle_ml(row: ManifestRow, prediction: np.ndarray, voxel_ml: float) -> float | None:
    """Predicted lesion volume inside the ventricles of an IXI brain (its DLMUSE labels), else None."""
    if row.extra.get("site") != "IXI-HH":
        return None
    labels_path = Path(str(row.image).replace("/T1/", "/DLMUSE/").replace("_T1.nii.gz", "_DLMUSE.nii.gz"))
    if not labels_path.is_file():
        return None
    labels = _labels(labels_path, row.image)
    return float((prediction & np.isin(labels, VENTRICLE_LABELS)).sum()) * voxel_ml


def _labels(path: Path, image: Path) -> np.ndarray:
    """An integer label map on the image's RAS+ grid (load_mask would binarise it)."""
    like = load_volume(image)
    img = nib.load(str(path))
    return like.from_native(np.asarray(img.dataobj).astype(np.int32))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def site_summary(board: Scoreboard, healthy: list[dict[str, Any]]) -> dict[str, Any]:
    summaries = board.summaries()
    fp = [h["fp_ml"] for h in healthy]
    comps = [h["fp_components"] for h in healthy]
    vent = [h["ventricle_ml"] for h in healthy if h["ventricle_ml"] is not None]
    return {"healthy": len(healthy), "fp_ml_median": _percentile(fp, 50), "fp_ml_p90": _percentile(fp, 90),
            "fp_components_median": _percentile(comps, 50), "ventricle_fp_ml_median": _percentile(vent, 50),
            "methods": {m: summaries[m] for m in METHODS} if board.extras else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lesioned", type=int, default=8, help="lesioned test brains per site (at most)")
    parser.add_argument("--healthy", type=int, default=1000, help="healthy test brains per site (at most)")
    args = parser.parse_args()
    model = load_bundle(args.bundle)
    calibration, cfg = model.require_calibration(), model.config
    backend = choose_backend("torch", model, select_device("cpu"))
    rows = [r for r in read_manifest(args.manifest) if r.split == "test"]
    by_site: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        by_site[str(r.extra["site"])].append(r)
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    boards: dict[str, Scoreboard] = {}
    healthy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for site, site_rows in by_site.items():
        board = boards[site] = Scoreboard(METHODS, calibration)
        for i, row in enumerate(site_rows[: args.healthy]):
            result = evaluate_volume(row, backend, cfg, calibration, METHODS, 16)
            board.add_control(row, result, calibration)
            pred = predict("phanes", result.scores["phanes"], result.region, calibration, result.voxel_ml)
            assert pred is not None
            healthy[site].append({"id": row.id, "fp_ml": float(pred.sum()) * result.voxel_ml,
                                  "fp_components": label_components(pred)[1],
                                  "ventricle_ml": ventricle_ml(row, pred, result.voxel_ml)})
            print(f"{site} healthy {i + 1}: {healthy[site][-1]}", flush=True)
        for i, row in enumerate(site_rows[: args.lesioned]):
            lesioned = lesioned_row(row, args.out / "data", i)
            result = evaluate_volume(lesioned, backend, cfg, calibration, METHODS, 16)
            board.add_lesioned(lesioned, result, calibration)
            print(f"{site} lesioned {i + 1}: true {lesioned.lesion_ml:.1f} mL", flush=True)
    report = {site: site_summary(boards[site], healthy[site]) for site in by_site}
    report["_per_volume"] = {site: boards[site].rows() for site in by_site}
    report["_healthy"] = healthy
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    print_table(report, by_site)


def print_table(report: dict[str, Any], sites: dict[str, list[ManifestRow]]) -> None:
    print(f"{'site':14s} {'held out':8s} {'n':>3s} {'FP med':>7s} {'FP p90':>7s} {'comp':>5s} {'vent':>5s} | "
          f"{'les':>3s} {'AUPRC P/RA':>11s} {'[Dice] P/RA':>11s} {'>10mL':>6s} {'1-10':>6s} {'|err|':>6s}")
    for site in sites:
        r = report[site]
        line = (f"{site:14s} {'no' if site in TRAINING_SITES else 'yes':8s} {r['healthy']:3d} {r['fp_ml_median']:7.2f} "
                f"{r['fp_ml_p90']:7.2f} {r['fp_components_median']:5.1f} {r['ventricle_fp_ml_median']:5.2f} |")
        if r["methods"]:
            p, ra = r["methods"]["phanes"], r["methods"]["ra"]
            size = p["lesion_recall_by_size"]
            line += (f" {p['n_volumes']:3d} {100 * p['auprc']:5.1f}/{100 * ra['auprc']:5.1f} "
                     f"{100 * p['best_dice']:5.1f}/{100 * ra['best_dice']:5.1f} "
                     f"{size['>10 mL']['found']}/{size['>10 mL']['total']:<4d} "
                     f"{size['1-10 mL']['found']}/{size['1-10 mL']['total']:<4d} "
                     f"{p['abs_volume_error_ml_median']:6.2f}")
        print(line)


if __name__ == "__main__":
    main()
