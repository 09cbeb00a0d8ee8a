"""`phanes calibrate`: compute a bundle's calibration on validation volumes and commit it into the bundle, or
into a copy of it (`out`: site calibration, e.g. of the shipped model on a site's own healthy controls).

Without tuning, `healthy` takes the paper's healthy percentiles (each on the grid where it is applied) and
the minimum lesion size healthy volumes almost never reach; with tuning (`tune`), the operating point with
the best Dice on validation volumes with inserted real lesions. The networks are read back from the
verified bundle, so the thresholds belong to exactly the stored weights. The test split is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.progress import Progress

from phanes_cli.calibrate.healthy import healthy_calibration
from phanes_cli.calibrate.insertion import healthy_validation, lesioned_validation
from phanes_cli.calibrate.options import CalibrateOptions
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


def _with_overrides(config: PhanesConfig, options: CalibrateOptions) -> PhanesConfig:
    """The config with the options' calibration settings (validated), built in memory: the bundle is written only
    once the calibration that uses them has succeeded (`bundle.write_calibration`). None keeps the bundle's value."""
    old = config.mask
    mask = replace(old, mask_percentile=old.mask_percentile if options.mask_percentile is None
                   else float(options.mask_percentile),
                   anomaly_percentile=old.anomaly_percentile if options.anomaly_percentile is None
                   else float(options.anomaly_percentile),
                   slice_context=old.slice_context if options.slice_context is None else bool(options.slice_context))
    old_tune = config.tune
    ml = old_tune.healthy_fp_budget_ml if options.healthy_fp_budget_ml is None else float(options.healthy_fp_budget_ml)
    count = (old_tune.healthy_fp_budget_components if options.healthy_fp_budget_components is None
             else float(options.healthy_fp_budget_components))
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


def calibrate(options: CalibrateOptions) -> Calibration:
    """Calibrate a bundle on the healthy volumes of `options.split` and store the thresholds in it.

    The percentile overrides are stored in the bundle. Tuning (`options.tune`, default: the config's
    `tune.enabled`) instead picks the mask percentile, anomaly threshold and minimum lesion size by Dice on the
    split's volumes with inserted lesions (`calibrate.tune`) and stores the choice, its validation figures and the
    chosen percentile in the bundle. `slice_context` and the healthy false-positive budgets override
    `mask.slice_context` and the `tune` budgets and are stored in the bundle with the calibration (an ablation on
    one trained model). Volumes without a brain mask get one under `skull_strip`. The networks are read back from
    the verified bundle, so the thresholds belong to exactly the stored weights. The test split is refused.
    With `out` the calibration goes into a copy of the bundle there (`bundle.copy_bundle`, made once it is
    computed) and the bundle is left as it is; without it a shipped model is refused.
    """
    options.validate()
    bundle, out = options.source(), options.out
    _claim_out(bundle, out)
    model = load_bundle(bundle, require_calibration=False)
    tuning = model.config.tune.enabled if options.tune is None else options.tune
    if tuning and (options.mask_percentile is not None or options.anomaly_percentile is not None):
        raise ConfigError("--tune chooses the thresholds itself: drop --mask-percentile / --anomaly-percentile, "
                          "or use --no-tune")
    cfg = _with_overrides(model.config, options)
    rows = healthy_rows(Path(options.manifest), options.split)
    dev = select_device(options.device)
    backend = choose_backend(options.backend, model, dev, options.lpips_weights)
    with make_progress(options.progress) as bar:
        data = load_slices(rows, cfg.preprocess, bar, description=f"loading {options.split} volumes",
                           skull_strip=options.skull_strip, device=str(dev))
        if tuning:
            calibration = _tuned(backend, cfg, data, rows, options.batch_size, bar, options.skull_strip)
            chosen = float(calibration.tuning["mask_percentile"])  # type: ignore[index]
            cfg = replace(cfg, mask=replace(cfg.mask, mask_percentile=chosen))
        else:
            calibration = healthy_calibration(backend, data, rows, cfg, options.batch_size, options.skull_strip,
                                              str(dev), bar)
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
