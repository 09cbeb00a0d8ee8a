"""Calibration: a model's two thresholds, learnt on healthy validation slices (method.md), and a minimum lesion size.

1. mask_threshold: the `mask_percentile` (99th) percentile of the stage 1 map m(x) over the brain
   pixels of every validation slice (paper: "the 99th percentile value on the healthy validation set").
2. anomaly_threshold: with that mask threshold, the full pipeline runs on the same slices and the
   threshold is the `anomaly_percentile` (99th) percentile of s(x) over the pixels where s(x) > 0.

Why positive values only: s(x) is zero by construction outside the inpainting mask, which covers
only a few percent of healthy brain, so a percentile over all brain pixels is usually exactly 0 and
would flag every inpainted pixel. s(x) is a measurement only where the generator painted; taking
the percentile there makes the lesion mask flag the top 1% of healthy inpainting residuals, i.e. far
fewer than 1% of healthy brain pixels, a conservative operating point for screening.

3. min_lesion_ml (without --tune): with both thresholds, each healthy volume's largest lesion component
   on its own grid; the `anomaly_percentile` of those sizes (`healthy_min_lesion_ml`). Screening drops
   smaller components, so a healthy brain almost never keeps one.

Both passes go through `pipeline.stage1_map` / `pipeline.run_slices`, the code screening uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from phanes_cli.backends import Backend, select_device
from phanes_cli.bundle import load_bundle, write_calibration
from phanes_cli.config import MaskConfig, PhanesConfig
from phanes_cli.errors import ConfigError, PhanesError
from phanes_cli.evaluation.lesions import label_components
from phanes_cli.manifest import ManifestRow
from phanes_cli.pipeline import Calibration, run_slices, run_volume, stage1_map
from phanes_cli.preprocess import load_with_brain
from phanes_cli.progress import make_progress
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.training.data import SliceSet, healthy_rows, load_slices


def percentile_of(chunks: list[Tensor], q: float) -> float:
    """The q-th percentile of the concatenated values (float64); NaN when there are none."""
    values = torch.cat(chunks).double().numpy() if chunks else np.zeros(0)
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, q))


def stage1_values(backend: Backend, data: SliceSet, cfg: MaskConfig, batch_size: int = 32,
                  advance: Callable[[], object] = lambda: None) -> list[Tensor]:
    """The stage 1 map m(x) over the brain pixels of `data`, one 1-D tensor per batch (`advance` after each)."""
    values: list[Tensor] = []
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(backend.device)
        brain = data.brain[start : start + batch_size].to(backend.device)
        ra_map = stage1_map(x, backend.reconstruct(x), brain, backend, cfg)
        values.append(ra_map[brain > 0].float().cpu())
        advance()
    return values


def stage1_percentile(backend: Backend, data: SliceSet, cfg: MaskConfig, batch_size: int = 32,
                      advance: Callable[[], object] = lambda: None) -> float:
    """The `mask_percentile` of the stage 1 maps m(x) over the brain pixels of `data`; NaN if there are none.

    The one rule for a mask threshold: calibration applies it to healthy validation slices, the trainer to
    healthy training slices (the holes stage 2 learns to fill), `tune` to every percentile it tries.
    """
    return percentile_of(stage1_values(backend, data, cfg, batch_size, advance), cfg.mask_percentile)


def calibration_thresholds(backend: Backend, data: SliceSet, cfg: PhanesConfig, batch_size: int = 32,
                           bar: Progress | None = None, n_volumes: int = 0) -> Calibration:
    """Both thresholds from healthy slices (see the module docstring for the rules)."""
    if len(data) == 0:
        raise PhanesError("calibration: the healthy volumes hold no brain slices")
    starts = range(0, len(data), batch_size)
    if bar is None:
        bar = make_progress(False)
    task = bar.add_task("calibration", total=2 * len(starts), info="stage 1 maps")
    mask_threshold = stage1_percentile(backend, data, cfg.mask, batch_size, lambda: bar.advance(task))
    if not np.isfinite(mask_threshold):
        raise PhanesError("calibration: the validation slices hold no brain pixels")
    provisional = Calibration(mask_threshold=mask_threshold, anomaly_threshold=float("inf"))
    bar.update(task, info=f"mask threshold {mask_threshold:.4g}; anomaly maps")
    anomaly_values: list[Tensor] = []
    for start in starts:
        part = slice(start, start + batch_size)
        maps = run_slices(data.images[part], data.brain[part], backend, cfg, provisional)
        s = maps.anomaly
        anomaly_values.append(s[(s > 0) & (data.brain[part].to(s.device) > 0)].float().cpu())
        bar.advance(task)
    anomaly_threshold = percentile_of(anomaly_values, cfg.mask.anomaly_percentile)
    if not np.isfinite(anomaly_threshold):
        raise PhanesError("calibration: stage 1 masked no pixel of the validation slices, so s(x) is zero everywhere; "
                          "the model cannot be calibrated (train longer or on more data)")
    bar.update(task, info=f"mask threshold {mask_threshold:.4g}, anomaly threshold {anomaly_threshold:.4g}")
    return Calibration(mask_threshold=mask_threshold, anomaly_threshold=anomaly_threshold,
                       n_slices=len(data), n_volumes=n_volumes)


def _with_percentiles(config: PhanesConfig, mask_percentile: float | None,
                      anomaly_percentile: float | None) -> PhanesConfig:
    """The config with the given calibration percentiles, built in memory: the bundle is written only once
    the calibration that uses them has succeeded (`bundle.write_calibration`)."""
    for name, value in (("mask_percentile", mask_percentile), ("anomaly_percentile", anomaly_percentile)):
        if value is not None and not 0 < value < 100:
            raise ConfigError(f"{name} must lie strictly between 0 and 100, got {value}")
    old = config.mask
    mask_q = old.mask_percentile if mask_percentile is None else float(mask_percentile)
    anomaly_q = old.anomaly_percentile if anomaly_percentile is None else float(anomaly_percentile)
    return replace(config, mask=replace(old, mask_percentile=mask_q, anomaly_percentile=anomaly_q))


def _tuned(backend: Backend, cfg: PhanesConfig, healthy: SliceSet, rows: list[ManifestRow], batch_size: int,
           bar: Progress, skull_strip: str) -> Calibration:
    """`tune.tune` on the healthy validation rows with real lesion shapes from the shipped bank inserted."""
    from phanes_cli.synth.shapes import npz_bank
    from phanes_cli.synth.templates import load_mni152
    from phanes_cli.tune import lesioned_validation, tune

    task = bar.add_task("tuning on validation lesions", total=None, info="inserting lesions")
    lesioned = lesioned_validation(rows, npz_bank(), load_mni152(), cfg.tune.copies, cfg.tune.seed, skull_strip,
                                   cfg.tune.shapes_per_volume)
    return tune(backend, cfg, healthy, lesioned, batch_size, lambda message: bar.update(task, info=message))


def healthy_min_lesion_ml(backend: Backend, rows: list[ManifestRow], cfg: PhanesConfig, calibration: Calibration,
                          batch_size: int, skull_strip: str, device: str, bar: Progress) -> float:
    """The smallest lesion size the healthy volumes almost never reach; 0 when none has a lesion component.

    Per healthy volume, the largest component of its lesion mask (screening's rule, on the volume grid);
    the `anomaly_percentile` of those sizes in mL. Smaller components are what healthy brains give, so
    screening drops them (`pipeline.drop_small_lesions`): most components a small model finds are tiny.
    """
    task = bar.add_task("minimum lesion size", total=len(rows), info="healthy volumes")
    largest: list[float] = []
    for row in rows:
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip, device=device)
        lesion = run_volume(volume.data, brain, backend, cfg, calibration, batch_size, keep=()).predicted_lesions
        labels, n = label_components(lesion)
        largest.append(float(np.bincount(labels.ravel())[1:].max()) * volume.voxel_ml if n else 0.0)
        bar.advance(task)
    return float(np.percentile(largest, cfg.mask.anomaly_percentile)) if largest else 0.0


def calibrate(bundle: Path, manifest: Path, device: str = "auto", batch_size: int = 32, split: str = "val",
              lpips_weights: str | None = None, progress: bool = True, mask_percentile: float | None = None,
              anomaly_percentile: float | None = None, tune: bool | None = None,
              skull_strip: str = "auto", backend_name: str = "auto") -> Calibration:
    """Calibrate a bundle on the healthy volumes of `split` and store the thresholds in it.

    `mask_percentile` / `anomaly_percentile` override the config's healthy percentiles and are stored in the
    bundle. `tune` (default: the config's `tune.enabled`) instead picks the mask percentile, anomaly threshold
    and minimum lesion size by Dice on the split's volumes with inserted lesions (`phanes_cli.tune`) and stores
    the choice, its validation figures and the chosen percentile in the bundle. Volumes without a brain mask
    get one under `skull_strip` (auto | always | never). The networks are read back from the verified bundle,
    so the thresholds belong to exactly the stored weights. The test split is refused.
    """
    bundle = Path(bundle)
    if split == "test":
        raise ConfigError("calibration never uses the 'test' split: thresholds chosen on test data would inflate "
                          "every test figure")
    model = load_bundle(bundle, require_calibration=False)
    tuning = model.config.tune.enabled if tune is None else tune
    if tuning and (mask_percentile is not None or anomaly_percentile is not None):
        raise ConfigError("--tune chooses the thresholds itself: drop --mask-percentile / --anomaly-percentile, "
                          "or use --no-tune")
    cfg = _with_percentiles(model.config, mask_percentile, anomaly_percentile)
    rows = healthy_rows(Path(manifest), split)
    dev = select_device(device)
    backend = choose_backend(backend_name, model, dev, lpips_weights)
    with make_progress(progress) as bar:
        data = load_slices(rows, cfg.preprocess, bar, description=f"loading {split} volumes", skull_strip=skull_strip,
                           device=str(dev))
        if tuning:
            calibration = _tuned(backend, cfg, data, rows, batch_size, bar, skull_strip)
            chosen = float(calibration.tuning["mask_percentile"])  # type: ignore[index]
            cfg = replace(cfg, mask=replace(cfg.mask, mask_percentile=chosen))
        else:
            calibration = calibration_thresholds(backend, data, cfg, batch_size, bar, n_volumes=len(rows))
            minimum = healthy_min_lesion_ml(backend, rows, cfg, calibration, batch_size, skull_strip, str(dev), bar)
            calibration = replace(calibration, min_lesion_ml=minimum)
    write_calibration(bundle, calibration, config=None if cfg == model.config else cfg)
    return calibration
