"""`phanes calibrate`: compute a bundle's calibration on validation volumes and commit it into the bundle, or
into a copy of it (`out`: site calibration, e.g. of the shipped model on a site's own healthy controls).

Without tuning, `healthy` takes the paper's healthy percentiles (each on the grid where it is applied) and
the minimum lesion size healthy volumes almost never reach; with tuning (`tune`), the operating point with
the best Dice on validation volumes with inserted real lesions. The networks are read back from the
verified bundle, so the thresholds belong to exactly the stored weights. The test split is refused.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from rich.progress import Progress

from phanes_cli.calibrate.healthy import healthy_calibration
from phanes_cli.calibrate.insertion import healthy_validation, lesioned_validation
from phanes_cli.calibrate.tune import tune as tune_operating_point
from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, check_writable, copy_bundle, load_bundle, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.infra.folders import claim_folder
from phanes_cli.infra.progress import make_progress
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from phanes_cli.training.data import SliceSet, healthy_rows, load_slices


def _with_overrides(config: PhanesConfig, mask_percentile: float | None, anomaly_percentile: float | None,
                    slice_context: bool | None = None, healthy_fp_budget_ml: float | None = None,
                    healthy_fp_budget_components: float | None = None) -> PhanesConfig:
    """The config with the given calibration settings, built in memory: the bundle is written only once
    the calibration that uses them has succeeded (`bundle.write_calibration`). None keeps the bundle's value."""
    for name, value in (("mask_percentile", mask_percentile), ("anomaly_percentile", anomaly_percentile)):
        if value is not None and not 0 < value < 100:
            raise ConfigError(f"{name} must lie strictly between 0 and 100, got {value}")
    for value, unit in ((healthy_fp_budget_ml, "mL"), (healthy_fp_budget_components, "components")):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"healthy false-positive budget must be a finite number of {unit} >= 0, got {value}")
    old = config.mask
    mask = replace(old, mask_percentile=old.mask_percentile if mask_percentile is None else float(mask_percentile),
                   anomaly_percentile=old.anomaly_percentile if anomaly_percentile is None
                   else float(anomaly_percentile),
                   slice_context=old.slice_context if slice_context is None else bool(slice_context))
    old_tune = config.tune
    ml = old_tune.healthy_fp_budget_ml if healthy_fp_budget_ml is None else float(healthy_fp_budget_ml)
    count = (old_tune.healthy_fp_budget_components if healthy_fp_budget_components is None
             else float(healthy_fp_budget_components))
    tune = replace(old_tune, healthy_fp_budget_ml=ml, healthy_fp_budget_components=count)
    return replace(config, mask=mask, tune=tune)


def _tuned(backend: Backend, cfg: PhanesConfig, healthy: SliceSet, rows: list[ManifestRow], batch_size: int,
           bar: Progress, skull_strip: str) -> Calibration:
    """`tune.tune` on the healthy validation rows with real lesion shapes from the shipped bank inserted."""
    task = bar.add_task("tuning on validation lesions", total=None, info="inserting lesions")
    lesioned = lesioned_validation(rows, npz_bank(), load_mni152(), cfg.tune.copies, cfg.tune.seed, skull_strip,
                                   cfg.tune.shapes_per_volume)
    clean = healthy_validation(rows, skull_strip)
    bar.update(task, total=len(cfg.tune.mask_percentiles), info="mask percentiles")  # one step per percentile
    return tune_operating_point(backend, cfg, healthy, lesioned, batch_size,
                                lambda message: bar.update(task, advance=1, info=message), clean)


OUT_HINT = "pass --out NEW_FOLDER: calibrate then writes a calibrated copy there and leaves this bundle as it is"
COPY = "a calibrated copy of a model bundle"


def _claim_out(bundle: Path, out: Path | None) -> None:
    """Refuse, before any work, a bundle that may not be written without `out`, or an `out` that may not be."""
    if out is None:
        check_writable(bundle, OUT_HINT)
        return
    if Path(out).resolve().is_relative_to(bundle.resolve()):
        raise ConfigError(f"--out {out}: lies inside the bundle {bundle}; choose a folder outside it")
    claim_folder(check_writable(out), (), COPY)


def calibrate(bundle: Path, manifest: Path, device: str = "auto", batch_size: int = 32, split: str = "val",
              lpips_weights: str | None = None, progress: bool = True, mask_percentile: float | None = None,
              anomaly_percentile: float | None = None, tune: bool | None = None,
              skull_strip: str = "auto", backend_name: str = "auto", slice_context: bool | None = None,
              healthy_fp_budget_ml: float | None = None,
              healthy_fp_budget_components: float | None = None, out: Path | None = None) -> Calibration:
    """Calibrate a bundle on the healthy volumes of `split` and store the thresholds in it.

    `mask_percentile` / `anomaly_percentile` override the config's healthy percentiles and are stored in the
    bundle. `tune` (default: the config's `tune.enabled`) instead picks the mask percentile, anomaly threshold
    and minimum lesion size by Dice on the split's volumes with inserted lesions (`calibrate.tune`) and stores
    the choice, its validation figures and the chosen percentile in the bundle. `slice_context` and
    `healthy_fp_budget_ml` / `healthy_fp_budget_components` override `mask.slice_context` and the `tune` budgets and
    are stored in the
    bundle with the calibration (an ablation on one trained model). Volumes without a brain mask
    get one under `skull_strip` (auto | always | never). The networks are read back from the verified bundle,
    so the thresholds belong to exactly the stored weights. The test split is refused.
    `out` (a new or empty folder): the calibration goes into a copy of the bundle there (`bundle.copy_bundle`,
    made once it is computed) and `bundle` is left as it is; without it a shipped model is refused.
    """
    bundle = Path(bundle)
    if split == "test":
        raise ConfigError("calibration never uses the 'test' split: thresholds chosen on test data would inflate "
                          "every test figure")
    _claim_out(bundle, out)
    model = load_bundle(bundle, require_calibration=False)
    tuning = model.config.tune.enabled if tune is None else tune
    if tuning and (mask_percentile is not None or anomaly_percentile is not None):
        raise ConfigError("--tune chooses the thresholds itself: drop --mask-percentile / --anomaly-percentile, "
                          "or use --no-tune")
    cfg = _with_overrides(model.config, mask_percentile, anomaly_percentile, slice_context, healthy_fp_budget_ml,
                          healthy_fp_budget_components)
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
            calibration = healthy_calibration(backend, data, rows, cfg, batch_size, skull_strip, str(dev), bar)
    target = bundle if out is None else _copy_of(model, Path(out))
    write_calibration(target, calibration, config=None if cfg == model.config else cfg)
    return calibration


def _copy_of(model: Bundle, out: Path) -> Path:
    """`out` holding a copy of `model`'s bundle, the same weights and config the calibration was computed with."""
    copy = copy_bundle(model.path, out)
    if copy.content_key != model.content_key:
        raise BundleError(f"{model.path}: changed during calibration; the copy in {out} is not the model calibrated, "
                          "nothing was committed")
    return out
