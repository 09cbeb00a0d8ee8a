"""Calibration: the two thresholds of a model, learnt on healthy validation slices (method.md).

1. mask_threshold: the `mask_percentile` (99th) percentile of the stage 1 map m(x) over the brain
   pixels of every validation slice (paper: "the 99th percentile value on the healthy validation set").
2. anomaly_threshold: with that mask threshold, the full pipeline runs on the same slices and the
   threshold is the `anomaly_percentile` (99th) percentile of s(x) over the pixels where s(x) > 0.

Why positive values only: s(x) is zero by construction outside the inpainting mask, which covers
only a few percent of healthy brain, so a percentile over all brain pixels is usually exactly 0 and
would flag every inpainted pixel. s(x) is a measurement only where the generator painted; taking
the percentile there makes the lesion mask flag the top 1% of healthy inpainting residuals, i.e. far
fewer than 1% of healthy brain pixels, a conservative operating point for screening.

Both passes go through `pipeline.stage1_map` / `pipeline.run_slices`, the code screening uses.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from phanes_cli.backends import Backend, TorchBackend, select_device
from phanes_cli.bundle import load_bundle, runtime_versions, save_bundle, write_calibration
from phanes_cli.config import PhanesConfig
from phanes_cli.errors import ConfigError, PhanesError
from phanes_cli.pipeline import Calibration, run_slices, stage1_map
from phanes_cli.training.data import SliceSet, healthy_rows, load_slices
from phanes_cli.training.progress import make_progress


def _percentile(chunks: list[Tensor], q: float) -> float:
    values = torch.cat(chunks).double().numpy() if chunks else np.zeros(0)
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, q))


def calibration_thresholds(backend: Backend, data: SliceSet, cfg: PhanesConfig, batch_size: int = 32,
                           bar: Progress | None = None, n_volumes: int = 0) -> Calibration:
    """Both thresholds from healthy slices (see the module docstring for the rules)."""
    if len(data) == 0:
        raise PhanesError("calibration: the healthy volumes hold no brain slices")
    starts = range(0, len(data), batch_size)
    ra_values: list[Tensor] = []
    if bar is None:
        bar = make_progress(False)
    task = bar.add_task("calibration", total=2 * len(starts), info="stage 1 maps")
    for start in starts:
        x = data.images[start : start + batch_size].to(backend.device)
        brain = data.brain[start : start + batch_size].to(backend.device)
        ra_map = stage1_map(x, backend.reconstruct(x), brain, backend, cfg.mask)
        ra_values.append(ra_map[brain > 0].float().cpu())
        bar.advance(task)
    mask_threshold = _percentile(ra_values, cfg.mask.mask_percentile)
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
    anomaly_threshold = _percentile(anomaly_values, cfg.mask.anomaly_percentile)
    if not np.isfinite(anomaly_threshold):
        raise PhanesError("calibration: stage 1 masked no pixel of the validation slices, so s(x) is zero everywhere; "
                          "the model cannot be calibrated (train longer or on more data)")
    bar.update(task, info=f"mask threshold {mask_threshold:.4g}, anomaly threshold {anomaly_threshold:.4g}")
    return Calibration(mask_threshold=mask_threshold, anomaly_threshold=anomaly_threshold,
                       n_slices=len(data), n_volumes=n_volumes)


def _set_percentiles(bundle: Path, mask_percentile: float | None, anomaly_percentile: float | None) -> PhanesConfig:
    """Store new calibration percentiles in the bundle's config (weights unchanged, index re-sealed)."""
    model = load_bundle(bundle, require_calibration=False)
    mask_cfg = model.config.mask
    for name, value in (("mask_percentile", mask_percentile), ("anomaly_percentile", anomaly_percentile)):
        if value is not None:
            if not 0 < value < 100:
                raise ConfigError(f"{name} must lie strictly between 0 and 100, got {value}")
            mask_cfg = replace(mask_cfg, **{name: float(value)})
    if mask_cfg == model.config.mask:
        return model.config
    config = replace(model.config, mask=mask_cfg)
    nets = model.networks()
    kept = {k: v for k, v in model.versions.items() if k not in runtime_versions()}
    save_bundle(bundle, config, nets.ra, nets.generator, extra=kept)
    return config


def calibrate(bundle: Path, manifest: Path, device: str = "auto", batch_size: int = 32, split: str = "val",
              lpips_weights: str | None = None, progress: bool = True, mask_percentile: float | None = None,
              anomaly_percentile: float | None = None) -> Calibration:
    """Calibrate a bundle on the healthy volumes of `split` and store the thresholds in it.

    `mask_percentile` / `anomaly_percentile` override the config's healthy percentiles and are stored in the bundle.
    """
    bundle = Path(bundle)
    config = _set_percentiles(bundle, mask_percentile, anomaly_percentile)
    rows = healthy_rows(Path(manifest), split)
    dev = select_device(device)
    with make_progress(progress) as bar:
        data = load_slices(rows, config.preprocess, bar, description=f"loading {split} volumes")
        return calibrate_on_slices(bundle, data, dev, batch_size, lpips_weights, bar, len(rows))


def calibrate_on_slices(bundle: Path, data: SliceSet, device: torch.device, batch_size: int = 32,
                        lpips_weights: str | None = None, bar: Progress | None = None, n_volumes: int = 0) -> Calibration:
    """Calibrate the networks stored in a bundle on prepared slices and seal the thresholds into it.

    The networks are read back from the verified bundle, so the thresholds belong to exactly the stored weights.
    """
    model = load_bundle(bundle, require_calibration=False)
    backend = TorchBackend(model.networks(lpips_weights), device)
    calibration = calibration_thresholds(backend, data, model.config, batch_size, bar, n_volumes=n_volumes)
    write_calibration(bundle, calibration)
    return calibration
