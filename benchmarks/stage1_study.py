"""Where the stage 1 map m(x) flags individual anatomy: variants of Eq. 3 scored on validation lesions.

Issue 14 asks why the inpainting mask of a small model misses lesions while flagging healthy anatomy, and
for each change to be justified by validation figures. This script takes a trained bundle and the
validation volumes of a manifest, inserts real stroke shapes exactly as `phanes calibrate --tune` does
(same seed, copies and shapes: the same lesions), runs stage 1 once per volume and scores variants of
m(x) that need no retraining, on the volume grid (brain voxels of processed slices):

- paper: Eq. 3 as configured (CLAHE, norm95 residual times the Gaussian-smoothed LPIPS map);
- lpips sigma s: the LPIPS map smoothed with another sigma (0 = not smoothed);
- no CLAHE: residual and LPIPS on the raw images; residual only / LPIPS only: one factor of Eq. 3;
- slice context: m(x) averaged with the neighbouring axial slices (weights 1/4, 1/2, 1/4), since lesions
  continue through slices while much of what flags individual anatomy does not;
- edge margin k: m(x) zeroed within k model pixels of the brain boundary.

Columns: pixel AUPRC of m(x) against the inserted lesions; lesion voxels covered by the top 5% and 10% of
m(x) in each brain (how much of a lesion an inpainting mask of that area would contain); and false
components: connected regions of that top 5% that touch no lesion, per volume. Test volumes are never read.
Usage: python benchmarks/stage1_study.py BUNDLE MANIFEST [--batch-size 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from phanes_cli.calibrate.tune import LesionedVolume, lesioned_validation
from phanes_cli.config import MaskConfig, PhanesConfig
from phanes_cli.core import ops
from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.components import label_components
from phanes_cli.core.pipeline import restore_score
from phanes_cli.core.preprocess import SliceGeometry, prepare_volume
from phanes_cli.evaluation.evaluate import BINS, MAX_SCORE
from phanes_cli.evaluation.metrics import PRHistogram
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from phanes_cli.training.data import healthy_rows

Variant = Callable[[dict[str, Tensor], MaskConfig], Tensor]


def slice_context(m: Tensor) -> Tensor:
    """(N,1,S,S) consecutive axial slices -> each averaged with its neighbours (1/4, 1/2, 1/4; edges replicated)."""
    padded = torch.cat([m[:1], m, m[-1:]])
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def variants() -> dict[str, Variant]:
    def paper(a: dict[str, Tensor], cfg: MaskConfig) -> Tensor:
        return ops.stage1_map(a["eq_x"], a["eq_rec"], a["lpips_eq"], a["brain"], cfg)

    def sigma(s: float) -> Variant:
        return lambda a, cfg: paper(a, replace(cfg, lpips_sigma=s))

    def residual_only(a: dict[str, Tensor], cfg: MaskConfig) -> Tensor:
        residual = (a["eq_rec"] - a["eq_x"]).abs() * a["brain"]
        return ops.norm_percentile(residual, cfg.norm_percentile, where=a["brain"] > 0) * a["brain"]

    def lpips_only(a: dict[str, Tensor], cfg: MaskConfig) -> Tensor:
        return ops.gaussian_blur(a["lpips_eq"], cfg.lpips_sigma) * a["brain"]

    def raw(a: dict[str, Tensor], cfg: MaskConfig) -> Tensor:
        return ops.stage1_map(a["x"], a["x_cph"], a["lpips_raw"], a["brain"], cfg)

    def margin(k: int, base: Variant = paper) -> Variant:
        return lambda a, cfg: base(a, cfg) * ops.erode(a["brain"], k)

    return {
        "paper (Eq. 3 as configured)": paper,
        "lpips sigma 0": sigma(0.0), "lpips sigma 1": sigma(1.0), "lpips sigma 4": sigma(4.0),
        "no CLAHE": raw,
        "residual only": residual_only, "LPIPS only": lpips_only,
        "slice context": lambda a, cfg: slice_context(paper(a, cfg)),
        "slice context + sigma 1": lambda a, cfg: slice_context(sigma(1.0)(a, cfg)),
        "edge margin 2 px": margin(2), "edge margin 4 px": margin(4),
        "no CLAHE + edge margin 2 px": margin(2, raw),
        "no CLAHE + slice context": lambda a, cfg: slice_context(raw(a, cfg)),
        "no CLAHE + slice context + edge margin 2 px": lambda a, cfg: slice_context(margin(2, raw)(a, cfg)),
    }


@torch.no_grad()
def stage1_inputs(volume: LesionedVolume, backend: Backend, config: PhanesConfig, batch_size: int
                  ) -> tuple[dict[str, Tensor], SliceGeometry]:
    """Stage 1 once for a volume: images, reconstruction, their CLAHE versions and both LPIPS maps."""
    cfg = config.mask
    prepared = prepare_volume(volume.image, volume.brain, config.preprocess, volume.zooms)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, prepared.slices.shape[0], batch_size):
        x = prepared.slices[start:start + batch_size]
        x_cph = backend.reconstruct(x)
        eq_x, eq_rec = ops.clahe(x, cfg), ops.clahe(x_cph, cfg)
        brain = prepared.brain[start:start + batch_size]
        batch = {"x": x, "x_cph": x_cph, "eq_x": eq_x, "eq_rec": eq_rec, "brain": brain,
                 "lpips_eq": backend.lpips(eq_rec, eq_x), "lpips_raw": backend.lpips(x_cph, x)}
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}, prepared.geometry


def top_fraction(score: np.ndarray, brain: np.ndarray, fraction: float) -> np.ndarray:
    level = np.quantile(score[brain], 1.0 - fraction)
    return (score >= level) & (score > 0) & brain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("manifest")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bundle = load_bundle(args.bundle)
    cfg = bundle.config
    backend = choose_backend("torch", bundle, torch.device("cpu"))
    rows = healthy_rows(args.manifest, "val")
    lesioned = lesioned_validation(rows, npz_bank(), load_mni152(), cfg.tune.copies, cfg.tune.seed, "auto",
                                   cfg.tune.shapes_per_volume)
    found: dict[str, dict[str, list[Any]]] = {name: {k: [] for k in ("c5", "c10", "fp")} for name in variants()}
    curves = {name: PRHistogram(BINS, MAX_SCORE) for name in variants()}  # evaluation's AUPRC, same bins
    for volume in lesioned:
        inputs, geometry = stage1_inputs(volume, backend, cfg, args.batch_size)
        processed = np.zeros_like(volume.brain)
        processed[:, :, geometry.covered] = True
        region = volume.brain & processed
        for name, variant in variants().items():
            score = restore_score(variant(inputs, cfg.mask).numpy(), geometry, volume.brain)
            acc = found[name]
            curves[name].update(score[region], volume.truth[region])
            lesion_voxels = max(int(volume.truth.sum()), 1)
            for key, fraction in (("c5", 0.05), ("c10", 0.10)):
                acc[key].append((top_fraction(score, region, fraction) & volume.truth).sum() / lesion_voxels)
            labels, n = label_components(top_fraction(score, region, 0.05))
            touching = np.unique(labels[volume.truth & (labels > 0)])
            acc["fp"].append(n - touching.size)
        print(f"{volume.id}: done", flush=True)
    table = Table(title=f"stage 1 map variants on {len(lesioned)} lesioned validation volumes")
    for column in ("variant", "AUPRC %", "lesion in top 5% %", "lesion in top 10% %", "false comps / vol (top 5%)"):
        table.add_column(column)
    for name, acc in found.items():
        ap = curves[name].average_precision()
        table.add_row(name, f"{100 * ap:.2f}", f"{100 * np.mean(acc['c5']):.1f}", f"{100 * np.mean(acc['c10']):.1f}",
                      f"{np.mean(acc['fp']):.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
