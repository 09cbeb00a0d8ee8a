"""Specificity ablation on validation volumes only (issue 20): what each choice buys, from one set of pipeline passes.

`phanes calibrate --tune` runs every validation volume (with inserted real lesions, and as it is) through the
pipeline once per mask percentile and then searches the anomaly threshold and minimum size. The choices
compared here differ only after those passes (the healthy false-positive budget, a lesion-persistence rule)
or in one switch of the passes themselves (slice context), so this script runs the passes once per
(slice context, mask percentile), caches the anomaly maps in `--cache`, and replays the tuning's selection
(`calibrate.tune.within_budget`) for every variant:

- budget: the median healthy false-positive mL per validation volume allowed (inf: the old, Dice-only objective);
- persistence: predicted components spanning fewer than k axial slices are dropped (k = 1: no rule);
- slice context: m(x) averaged with the neighbouring slices before binarising (`mask.slice_context`);
- component budget: the median healthy false-positive components per validation volume allowed as well
  (`tune.healthy_fp_budget_components`; inf: none).

Usage (the bundle is only read; test rows are never loaded):
    python benchmarks/specificity_ablation.py --bundle runs/b20-f0.5 --data runs/c20-f0.5/manifest.parquet \
        --cache runs/abl-f0.5 [--context off,on] [--budgets 2,5,10,inf] [--persistence 1,2,3]
        [--component-budgets 1,2,inf]
Prints one row per variant: chosen percentile, threshold, minimum size, lesion Dice, median |burden error|,
healthy false positives (median mL and components per volume) and whether the budget was met.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from phanes_cli.calibrate.insertion import LesionedVolume, healthy_validation, lesioned_validation
from phanes_cli.calibrate.tune import candidate_thresholds, within_budget
from phanes_cli.config import PhanesConfig
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.components import label_components
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.percentiles import percentile_of, stage1_values
from phanes_cli.core.pipeline import run_volume
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from phanes_cli.training.data import healthy_rows, load_slices


@dataclass(frozen=True)
class Pass:
    """Anomaly maps of every validation volume at one (slice context, mask percentile)."""

    context: bool
    percentile: float
    lesioned: list[np.ndarray]
    clean: list[np.ndarray]


def compute_passes(bundle: Path, manifest: Path, cache: Path, contexts: list[bool]) -> tuple[list[Pass], list[
        LesionedVolume], list[LesionedVolume], PhanesConfig, dict[str, float]]:
    """Run (or read back from `cache`) the pipeline passes the tuning would run, for each slice-context setting."""
    model = load_bundle(bundle, require_calibration=False)  # the passes need no calibration: they make one
    rows = healthy_rows(manifest, "val")
    cfg0 = model.config
    lesioned = lesioned_validation(rows, npz_bank(), load_mni152(), cfg0.tune.copies, cfg0.tune.seed, "auto",
                                   cfg0.tune.shapes_per_volume)
    clean = healthy_validation(rows, "auto")
    backend = choose_backend("auto", model, select_device("cpu"), None)
    data = load_slices(rows, cfg0.preprocess, None, skull_strip="auto", device="cpu")
    passes, seconds = [], {}
    for context in contexts:
        cfg = replace(cfg0, mask=replace(cfg0.mask, slice_context=context))
        values = stage1_values(backend, data.images, data.brain, cfg.mask, 32, volumes=data.volume)
        start = time.perf_counter()
        for q in cfg.tune.mask_percentiles:
            path = cache / f"ctx{int(context)}-p{q:g}.npz"
            if not path.exists():
                t = percentile_of(values, q)
                maps = [run_volume(v.image, v.brain, v.zooms, backend, cfg, t, 32, keep=()).anomaly
                        for v in [*lesioned, *clean]]
                cache.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, *maps)
                print(f"  pass: slice context {context}, percentile {q:g} ({time.perf_counter() - start:.0f} s)")
            with np.load(path) as stored:
                maps = [stored[f"arr_{i}"] for i in range(len(lesioned) + len(clean))]
            passes.append(Pass(context, q, maps[:len(lesioned)], maps[len(lesioned):]))
        seconds[f"context {context}"] = time.perf_counter() - start
    return passes, lesioned, clean, cfg0, seconds


def components(score: np.ndarray, volume: LesionedVolume, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of threshold t as components: size (mL), voxels inside the truth, axial extent (slices)."""
    labels, n = label_components(LesionRule(t).candidates(score, volume.brain))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    overlap = np.bincount(labels[volume.truth], minlength=n + 1)[1:]
    extent = np.array([b[2].stop - b[2].start for b in ndimage.find_objects(labels)], dtype=np.int64)
    return sizes * volume.voxel_ml, overlap * volume.voxel_ml, extent.reshape(n)


def grid_figures(p: Pass, lesioned: list[LesionedVolume], clean: list[LesionedVolume], thresholds: np.ndarray,
                 sizes: list[float], ks: list[int]) -> dict[str, np.ndarray]:
    """Per persistence k: Dice (K, T, M) pooled over lesioned volumes; healthy FP mL and components (K, V, T, M);
    burden errors (K, V, T, M). Components under the minimum size or spanning fewer than k slices are dropped."""
    shape = (len(ks), len(thresholds), len(sizes))
    tp, pred = np.zeros(shape), np.zeros(shape)
    truth = sum(float(v.truth.sum()) * v.voxel_ml for v in lesioned)
    burden = np.zeros((len(ks), len(lesioned), *shape[1:]))
    fp_ml, fp_n = np.zeros((len(ks), len(clean), *shape[1:])), np.zeros((len(ks), len(clean), *shape[1:]))
    min_ml = np.asarray(sizes)[:, None]
    for i, t in enumerate(thresholds):
        for v, (s, vol) in enumerate(zip(p.lesioned, lesioned, strict=True)):
            ml, overlap, extent = components(s, vol, t)
            for a, k in enumerate(ks):
                keep = (ml[None] >= min_ml) & (extent[None] >= k)  # (M, components)
                tp[a, i] += (keep * overlap[None]).sum(1)
                kept = (keep * ml[None]).sum(1)
                pred[a, i] += kept
                burden[a, v, i] = kept - float(vol.truth.sum()) * vol.voxel_ml
        for v, (s, vol) in enumerate(zip(p.clean, clean, strict=True)):
            ml, _, extent = components(s, vol, t)
            for a, k in enumerate(ks):
                keep = (ml[None] >= min_ml) & (extent[None] >= k)
                fp_ml[a, v, i], fp_n[a, v, i] = (keep * ml[None]).sum(1), keep.sum(1)
    return {"dice": 2 * tp / np.maximum(pred + truth, 1e-9), "fp_ml": fp_ml, "fp_n": fp_n, "burden": burden}


def choose(passes: list[Pass], grids: dict[tuple[bool, float], tuple[np.ndarray, dict[str, np.ndarray]]],
           sizes: list[float], context: bool, budget: float, a: int, components: float = np.inf) -> dict[str, Any]:
    """The tuning's choice for one variant: best admissible Dice over percentiles (else least healthy FP)."""
    best: dict[str, Any] = {}
    for p in (p for p in passes if p.context == context):
        thresholds, g = grids[(context, p.percentile)]
        i, j, met = within_budget(g["dice"][a], g["fp_ml"][a], budget, g["fp_n"][a], components)
        row = {"q": p.percentile, "t": float(thresholds[i]), "min_ml": sizes[j], "dice": float(g["dice"][a, i, j]),
               "met": met, "fp_ml": float(np.median(g["fp_ml"][a, :, i, j])),
               "fp_n": float(np.median(g["fp_n"][a, :, i, j])),
               "burden": float(np.median(np.abs(g["burden"][a, :, i, j])))}
        if not best or _rank(row) > _rank(best):
            best = row
    return best


def _rank(row: dict[str, Any]) -> tuple[bool, float]:
    """The tuning's order (`calibrate.tune._better`): within budget first, then Dice, else less healthy FP."""
    return bool(row["met"]), float(row["dice"] if row["met"] else -row["fp_ml"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--context", default="off,on")
    parser.add_argument("--budgets", default="2,5,10,inf")
    parser.add_argument("--persistence", default="1,2,3")
    parser.add_argument("--component-budgets", default="1,inf")
    args = parser.parse_args()
    contexts = [c == "on" for c in args.context.split(",")]
    passes, lesioned, clean, cfg, seconds = compute_passes(args.bundle, args.data, args.cache, contexts)
    print(f"{len(lesioned)} lesioned + {len(clean)} healthy validation volumes; pass seconds: {seconds}")
    print(f"{'context':8}{'budget':>7}{'comp':>5}{'k':>3}{'p':>5}{'min mL':>7}{'Dice':>7}{'|burden| mL':>12}"
          f"{'healthy FP mL':>14}{'comp':>6}  met")
    ks = [int(x) for x in args.persistence.split(",")]
    sizes = list(cfg.tune.min_lesion_ml)
    grids = {}
    for p in passes:
        thresholds = candidate_thresholds(p.lesioned + p.clean, cfg.tune.anomaly_candidates)
        grids[(p.context, p.percentile)] = (thresholds, grid_figures(p, lesioned, clean, thresholds, sizes, ks))
    for context in contexts:
        for a, k in enumerate(ks):
            for budget, comp in itertools.product(*(map(float, v.split(",")) for v in (args.budgets,
                                                                                          args.component_budgets))):
                r = choose(passes, grids, sizes, context, budget, a, comp)
                print(f"{'on' if context else 'off':8}{budget:>7g}{comp:>5g}{k:>3}{r['q']:>5g}{r['min_ml']:>7g}"
                      f"{r['dice']:>7.3f}{r['burden']:>12.1f}{r['fp_ml']:>14.1f}{r['fp_n']:>6.1f}  {r['met']}")


if __name__ == "__main__":
    main()
