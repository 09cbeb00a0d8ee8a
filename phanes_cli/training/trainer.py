"""`phanes train`: the stage loop. Stage 1 (Soft-IntroVAE + reversed embedding), then stage 2 (AOT-GAN).

Why sequential: stage 2 learns to inpaint the holes that stage 1 cuts, so its training masks are the
masks a converged stage 1 produces on healthy training images, united with random shapes. The stage 1
threshold (the calibration percentile of the stage 1 maps over healthy training slices) is computed once
when stage 1 ends; the frozen stage 1 then masks every (augmented) stage 2 batch as inference would.
Training both at once would feed the generator masks of a half-trained RA that do not resemble those
seen at inference. (The authors' code updates RA and generator in the same loop, optionally starting
from a pre-trained RA, so its early stage 2 masks come from a moving stage 1.)

Per stage: seeded, augmented batches (`steps`); validation after every `val_every` epochs
(`validation`); early stopping after `patience` validations without improvement; `max_epochs` /
`max_steps` caps. The best weights by validation go into the bundle. A checkpoint (`checkpoint`) is
written every `checkpoint_every` epochs and at each stage end; the `resume` option continues from it. The
bundle is left uncalibrated: the `train` command calibrates it next (`phanes_cli.calibrate.run`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.progress import Progress, TaskID
from torch import Tensor, nn

from phanes_cli.config import PhanesConfig, StageTrainConfig
from phanes_cli.core.bundle import INDEX_FILE, WEIGHT_FILES, Bundle, check_writable, load_bundle, save_bundle
from phanes_cli.errors import ConfigError
from phanes_cli.infra.progress import format_losses, make_progress
from phanes_cli.models import SoftIntroVAE
from phanes_cli.runtimes.pytorch import fit_weights, select_device
from phanes_cli.training import validation
from phanes_cli.training.checkpoint import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    RunState,
    load_run,
    load_weights,
    save_run,
    save_weights,
)
from phanes_cli.training.data import SliceSet, epoch_batches, healthy_rows, load_slices
from phanes_cli.training.metrics_log import METRICS_FILE, Averages, MetricsLog
from phanes_cli.training.options import TrainOptions
from phanes_cli.training.provenance import PROVENANCE_FILE, training_provenance
from phanes_cli.training.steps import Learner


@dataclass(frozen=True)
class _Stage:
    """What differs between the two stage loops."""

    number: int
    name: str
    schedule: StageTrainConfig
    step: Callable[[Tensor], dict[str, float]]  # batch indices -> losses
    validate: Callable[[], float]
    best_modules: dict[str, nn.Module]
    shown: tuple[str, ...]


@dataclass
class _Session:
    """One `train` call: the learner, its progress, where it writes, and when it started."""

    learner: Learner
    state: RunState
    out: Path
    metrics: MetricsLog
    bar: Progress
    start: float

    def elapsed(self) -> float:
        """Training wall time over all sessions so far."""
        return self.state.seconds + time.perf_counter() - self.start

    def checkpoint(self) -> None:
        saved = RunState.from_json(self.state.to_json())
        saved.seconds = self.elapsed()
        learner = self.learner
        save_run(self.out / CHECKPOINT_DIR / LAST_CHECKPOINT, learner.modules, learner.optimizers, learner.sampler,
                 saved, learner.config)


def _check_out(out: Path, resume: bool) -> None:
    check_writable(out, "train into a folder of your own")  # before hours of training, not at the bundle's save
    if resume:
        return
    if (out / INDEX_FILE).exists():
        raise ConfigError(f"{out}: already holds a trained model bundle; pass --resume to continue/finish that run, "
                          "or choose another --out folder (a finished model is never overwritten)")
    if (out / CHECKPOINT_DIR / LAST_CHECKPOINT).exists():
        raise ConfigError(f"{out}: holds an unfinished training run; pass --resume to continue it "
                          "or choose another --out folder")


def _capped(sched: StageTrainConfig, state: RunState) -> bool:
    return state.epoch >= sched.max_epochs or (sched.max_steps is not None and state.step >= sched.max_steps)


def snapshot_path(out: Path, stage: int, step: int) -> Path:
    """Where `train.snapshot_every` keeps a stage's weights at a step (the modules of its best-weights file)."""
    return out / CHECKPOINT_DIR / f"stage{stage}_step{step:06d}.safetensors"


def _best_path(session: _Session, spec: _Stage) -> Path:
    return session.out / CHECKPOINT_DIR / f"best_stage{spec.number}.safetensors"


def _run_epoch(spec: _Stage, session: _Session, n_train: int, averages: Averages, task: TaskID) -> None:
    """One seeded pass over the training slices (stopped early by `max_steps`)."""
    cfg, state, sched = session.learner.config.train, session.state, spec.schedule
    for index in epoch_batches(n_train, cfg.batch_size, cfg.seed, spec.number, state.epoch):
        if sched.max_steps is not None and state.step >= sched.max_steps:
            break
        values = spec.step(index)
        state.step += 1
        averages.add(values)
        if cfg.snapshot_every and state.step % cfg.snapshot_every == 0:
            save_weights(snapshot_path(session.out, spec.number, state.step), spec.best_modules)
        session.bar.update(task, completed=state.step, info=format_losses(values, spec.shown))
    state.epoch += 1


def _validate(spec: _Stage, session: _Session, averages: Averages) -> None:
    """Score the stage, keep the weights if they are the best so far, log the event."""
    state = session.state
    val = spec.validate()
    if not math.isfinite(val):
        raise FloatingPointError(f"stage {spec.number}: validation loss is {val} at step {state.step}")
    if val < state.best_val:
        state.best_val, state.best_step, state.bad_evals = val, state.step, 0
        save_weights(_best_path(session, spec), spec.best_modules)
    else:
        state.bad_evals += 1
    session.metrics.append({"stage": spec.number, "epoch": state.epoch, "step": state.step, **averages.means(),
                            "val_loss": val, "best_val": state.best_val, "seconds": session.elapsed()})


def _finish_stage(spec: _Stage, session: _Session, task: TaskID) -> None:
    """Restore the best weights, record why the stage stopped, move on to the next stage and checkpoint."""
    state, sched = session.state, spec.schedule
    if state.bad_evals >= sched.patience:
        reason = "early_stopping"
    elif sched.max_steps is not None and state.step >= sched.max_steps:
        reason = "max_steps"
    else:
        reason = "max_epochs"
    load_weights(_best_path(session, spec), spec.best_modules)
    state.stages.append({"stage": spec.number, "steps": state.step, "epochs": state.epoch, "best_val": state.best_val,
                         "best_step": state.best_step, "stopped_by": reason})
    state.stage, state.epoch, state.step = spec.number + 1, 0, 0
    state.best_val, state.best_step, state.bad_evals = math.inf, -1, 0
    session.checkpoint()
    session.bar.update(task, info=f"best val {state.stages[-1]['best_val']:.4g} ({reason})")


def _run_stage(spec: _Stage, session: _Session, n_train: int) -> None:
    """Epoch loop with validation, early stopping, best-weight tracking and checkpoints; ends the stage."""
    cfg, state, sched = session.learner.config.train, session.state, spec.schedule
    per_epoch = len(epoch_batches(n_train, cfg.batch_size, cfg.seed, spec.number, 0))
    total = per_epoch * sched.max_epochs
    if sched.max_steps is not None:
        total = min(total, sched.max_steps)
    task = session.bar.add_task(f"stage {spec.number} ({spec.name})", total=total, completed=state.step, info="")
    averages = Averages()
    if _capped(sched, state) and state.best_step < 0:
        raise ConfigError(f"train.stage{spec.number}: max_epochs/max_steps allow no training step")
    while not _capped(sched, state) and state.bad_evals < sched.patience:
        _run_epoch(spec, session, n_train, averages, task)
        if state.epoch % sched.val_every == 0 or _capped(sched, state):
            _validate(spec, session, averages)
            averages = Averages()
        if state.epoch % cfg.checkpoint_every == 0 and not _capped(sched, state) and state.bad_evals < sched.patience:
            session.checkpoint()
    _finish_stage(spec, session, task)


def _stage1(learner: Learner, train_set: SliceSet, val_view: SliceSet) -> _Stage:
    return _Stage(1, "RA", learner.config.train.stage1,
                  step=lambda idx: learner.stage1_step(train_set.images[idx]),
                  validate=lambda: validation.stage1_validation(learner, val_view),
                  best_modules={"ra": learner.networks.ra},
                  shown=("loss_encoder", "loss_decoder", "rec", "kl"))


def _stage2(learner: Learner, train_set: SliceSet, val_view: SliceSet, threshold: float) -> _Stage:
    holes = validation.validation_holes(learner.config, val_view)
    return _Stage(2, "AOT-GAN", learner.config.train.stage2,
                  step=lambda idx: learner.stage2_step(train_set.images[idx], train_set.brain[idx], threshold),
                  validate=lambda: validation.stage2_validation(learner, val_view, holes),
                  best_modules={"generator": learner.networks.generator},
                  shown=("loss_generator", "loss_discriminator", "l1", "adv"))


def stage1_source(bundle_dir: Path, config: PhanesConfig) -> Bundle:
    """The verified bundle whose stage 1 (RA) a run reuses (a folder: `TrainOptions.validate`): a ConfigError unless
    it has the run config's `ra` and `preprocess` sections, a BundleError unless its RA weights fit them (checked
    before any data is loaded)."""
    bundle = load_bundle(bundle_dir, require_calibration=False)
    for section in ("ra", "preprocess"):
        if getattr(bundle.config, section) != getattr(config, section):
            raise ConfigError(f"{bundle_dir}: its {section} settings differ from the run config's, so its stage 1 "
                              f"cannot be reused (--stage1-from needs the same {section} section)")
    fit_weights(SoftIntroVAE(config.ra, image_size=config.preprocess.image_size), bundle.ra_state,
                 bundle.path / WEIGHT_FILES["ra"])
    return bundle


def _from_stage1(learner: Learner, bundle: Bundle) -> RunState:
    """A run that starts at stage 2 on the stage 1 (RA) of `bundle`."""
    fit_weights(learner.networks.ra, bundle.ra_state, bundle.path / WEIGHT_FILES["ra"])
    return RunState(stage=2, stages=[{"stage": 1, "from_bundle": str(bundle.path.resolve()),
                                      "bundle_hash": bundle.hash}])


def _start_or_resume(learner: Learner, out: Path, resume: bool, metrics: MetricsLog, bar: Progress,
                     stage1_from: Bundle | None) -> RunState:
    """The checkpointed progress with `resume` (and the metrics log cut back to it), else a fresh run (at stage 2
    on `stage1_from`'s stage 1 when given)."""
    ckpt_path = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if resume and ckpt_path.is_file():
        state = load_run(ckpt_path, learner.modules, learner.optimizers, learner.sampler, learner.config)
        metrics.truncate_after(state.stage, state.step)
        bar.console.print(f"resuming {escape(str(out))}: stage {min(state.stage, 2)}, epoch {state.epoch}, "
                          f"step {state.step}")
        return state
    if resume:
        bar.console.print(f"no checkpoint in {escape(str(out / CHECKPOINT_DIR))}: starting a new run")
    metrics.reset()
    return RunState() if stage1_from is None else _from_stage1(learner, stage1_from)


def _load_healthy(manifest: Path, config: PhanesConfig, bar: Progress, skull_strip: str, device: str
                  ) -> tuple[SliceSet, SliceSet, int, int]:
    """Training and validation slices, plus their volume counts; a ConfigError when either holds none."""
    train_rows, val_rows = healthy_rows(manifest, "train"), healthy_rows(manifest, "val")
    train_set = load_slices(train_rows, config.preprocess, bar, "loading training volumes", skull_strip, device)
    val_set = load_slices(val_rows, config.preprocess, bar, "loading validation volumes", skull_strip, device)
    for name, data in (("train", train_set), ("val", val_set)):
        if len(data) == 0:
            raise ConfigError(f"{manifest}: the healthy {name!r} volumes hold no brain slices")
    return train_set, val_set, len(train_rows), len(val_rows)


def train(options: TrainOptions) -> Path:
    """Train both stages on the healthy train split and write the best weights as an uncalibrated bundle.

    Returns the bundle folder (`options.out`). `resume` continues from `out/checkpoints/last.safetensors`.
    `stage1_from` (a bundle) skips stage 1 and trains stage 2 on that bundle's RA, e.g. with other holes.
    """
    options.validate()
    config, out, manifest = options.config, Path(options.out), Path(options.manifest)
    _check_out(out, options.resume)
    stage1 = None if options.stage1_from is None else stage1_source(Path(options.stage1_from), config)
    dev = select_device(options.device)
    with make_progress(options.progress) as bar:
        train_set, val_set, n_train, n_val = _load_healthy(manifest, config, bar, options.skull_strip, str(dev))
        learner = Learner(config, dev, options.lpips_weights)
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / METRICS_FILE)
        state = _start_or_resume(learner, out, options.resume, metrics, bar, stage1)
        session = _Session(learner, state, out, metrics, bar, time.perf_counter())
        val_view = validation.validation_view(val_set)
        if state.stage == 1:
            _run_stage(_stage1(learner, train_set, val_view), session, len(train_set))
        if state.stage == 2:
            threshold = validation.stage1_threshold(learner, train_set)
            state.stage2_mask_threshold = threshold
            _run_stage(_stage2(learner, train_set, val_view, threshold), session, len(train_set))
        summary = {"stages": state.stages, "seed": config.train.seed, "device": str(dev),
                   "train_volumes": n_train, "train_slices": len(train_set),
                   "val_volumes": n_val, "val_slices": len(val_set),
                   "stage2_mask_threshold": state.stage2_mask_threshold, "seconds": session.elapsed()}
        learner.networks.eval()
        provenance = training_provenance(manifest, healthy_rows(manifest, "train"), healthy_rows(manifest, "val"),
                                         summary)
        save_bundle(out, config, learner.networks.ra, learner.networks.generator, extra={"training": summary},
                    files={PROVENANCE_FILE: provenance})
    return out
