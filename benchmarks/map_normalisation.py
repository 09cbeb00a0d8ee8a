"""Does dividing each volume's anomaly map by its own healthy-tissue level make the operating point carry across sites?

Per-volume normalisation divides s(x) by a statistic of the same volume's stage 1 map m(x) over its brain (a volume
whose tissue reconstructs worse, e.g. a site the model saw less, reads higher everywhere; a lesion covers too little
of the brain to move the statistic). Judged on the validation split only, like `calibrate --tune`: the healthy
validation brains as they are and with real stroke shapes inserted, the bundle's mask threshold. For the raw map
and each normalisation, the operating point is tuned as `tune` does (anomaly threshold and minimum size, best
pooled Dice within the healthy false-positive budgets), and the table gives that Dice, the pooled pixel AUPRC
(lesioned and healthy brains together: per-volume scaling changes how volumes rank against each other) and the
median healthy false lesion volume per site at that point.

Usage:
    python benchmarks/map_normalisation.py BUNDLE --manifest runs/real/manifest.parquet [--split val]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from phanes_cli.calibrate.insertion import LesionedVolume, healthy_validation, lesioned_validation
from phanes_cli.calibrate.tune import candidate_thresholds, dice_grid, healthy_fp, within_budget
from phanes_cli.config import TuneConfig
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.pipeline import run_volume
from phanes_cli.evaluation.metrics import PRHistogram
from phanes_cli.runtimes.select import build_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from phanes_cli.training.data import healthy_rows

Maps = tuple[np.ndarray, np.ndarray]  # (s(x), m(x)) on the volume grid

NORMALISATIONS: dict[str, Callable[[Maps, np.ndarray], np.ndarray]] = {
    "raw s(x)": lambda maps, brain: maps[0],
    "s / median m(brain)": lambda maps, brain: maps[0] / max(float(np.median(maps[1][brain])), 1e-6),
    "s / p95 m(brain)": lambda maps, brain: maps[0] / max(float(np.percentile(maps[1][brain], 95)), 1e-6),
    "s / p99 m(brain)": lambda maps, brain: maps[0] / max(float(np.percentile(maps[1][brain], 99)), 1e-6),
}


def site_of(volume_id: str) -> str:
    return volume_id.split("-")[0]


def pooled_auprc(scores: Sequence[np.ndarray], volumes: Sequence[LesionedVolume]) -> float:
    top = max(float(max(s.max() for s in scores)), 1e-6)
    hist = PRHistogram(max_score=top)
    for score, volume in zip(scores, volumes, strict=True):
        hist.update(score[volume.brain], volume.truth[volume.brain])
    return hist.average_precision()


@dataclass(frozen=True)
class Judged:
    name: str
    dice: float
    met: bool
    auprc: float
    fp_ml: dict[str, float]  # median healthy false lesion volume per site


def judged(name: str, lesioned: list[np.ndarray], clean: list[np.ndarray], les: list[LesionedVolume],
           healthy: list[LesionedVolume], tune: TuneConfig) -> Judged:
    """The tuned operating point of one map variant and its figures."""
    thresholds = candidate_thresholds(lesioned + clean, tune.anomaly_candidates)
    grid = dice_grid(lesioned, les, thresholds, tune.min_lesion_ml)
    fp_ml, fp_count = healthy_fp(clean, healthy, thresholds, tune.min_lesion_ml)
    i, j, met = within_budget(grid, fp_ml, tune.healthy_fp_budget_ml, fp_count, tune.healthy_fp_budget_components)
    per_site: dict[str, list[float]] = {}
    for volume, ml in zip(healthy, fp_ml[:, i, j], strict=True):
        per_site.setdefault(site_of(volume.id), []).append(float(ml))
    return Judged(name, float(grid[i, j]), met, pooled_auprc(lesioned + clean, les + healthy),
                  {site: float(np.median(v)) for site, v in sorted(per_site.items())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    cfg, cal = bundle.config, bundle.require_calibration()
    backend = build_backend("torch", bundle, torch.device("cpu"))
    rows = healthy_rows(args.manifest, args.split)
    les = lesioned_validation(rows, npz_bank(), load_mni152(), cfg.tune.copies, cfg.tune.seed,
                              shapes=cfg.tune.shapes_per_volume)
    healthy = healthy_validation(rows)
    maps: dict[str, Maps] = {}
    for v in les + healthy:
        out = run_volume(v.image, v.brain, v.zooms, backend, cfg, cal.mask_threshold, keep=("stage1_map",))
        assert out.stage1_map is not None
        maps[v.id] = (out.anomaly, out.stage1_map)
        print(f"{v.id}: done", flush=True)
    results = []
    for name, norm in NORMALISATIONS.items():
        lesioned = [norm(maps[v.id], v.brain) for v in les]
        clean = [norm(maps[v.id], v.brain) for v in healthy]
        results.append(judged(name, lesioned, clean, les, healthy, cfg.tune))
    sites = sorted({s for r in results for s in r.fp_ml})
    print(f"\n{bundle.path.name}, split {args.split}: {len(les)} lesioned, {len(healthy)} healthy brains; budgets "
          f"{cfg.tune.healthy_fp_budget_ml:g} mL / {cfg.tune.healthy_fp_budget_components:g} component(s)")
    print(f"{'map':<22} {'Dice':>6} {'budget':>7} {'AUPRC':>6} " + " ".join(f"{'FP ' + s:>14}" for s in sites))
    for r in results:
        print(f"{r.name:<22} {r.dice:6.3f} {'met' if r.met else 'over':>7} {r.auprc:6.3f} "
              + " ".join(f"{r.fp_ml.get(s, float('nan')):14.2f}" for s in sites))


if __name__ == "__main__":
    main()
