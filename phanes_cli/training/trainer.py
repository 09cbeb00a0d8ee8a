"""`phanes train`: stage 1 (Soft-IntroVAE + reversed embedding), then stage 2 (AOT-GAN), then calibration.

Why sequential: stage 2 learns to inpaint the holes that stage 1 cuts, so its training masks are the
masks a converged stage 1 produces on healthy training images, united with random shapes. The stage 1
threshold (the 99th percentile of the stage 1 maps over the healthy training slices) is computed once
when stage 1 ends; the frozen stage 1 then masks every (augmented) stage 2 batch as inference would.
Training both at once would feed the generator masks of a half-trained RA that do not resemble those
seen at inference. (The authors' code updates RA and generator in the same loop, optionally starting
from a pre-trained RA, so its early stage 2 masks come from a moving stage 1.) As in AOT-GAN and the
reference, the L1/style/perceptual terms compare the raw generator output with the image and the
adversarial term judges the composite; unlike the reference, the generator's adversarial term is
back-propagated.

Per stage: seeded, augmented batches (paper augmentation); validation on the healthy val split after
every `val_every` epochs (stage 1: reconstruction MSE; stage 2: L1 inside fixed random holes); early
stopping after `patience` validations without improvement; `max_epochs` / `max_steps` caps. The best
weights by validation go into the bundle. A checkpoint (weights, optimisers, RNG states; no pickle) is
written every `checkpoint_every` epochs and at each stage end; `resume=True` continues from it.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from phanes_cli.atomic import atomic_path
from phanes_cli.backends import PhanesNetworks, select_device
from phanes_cli.bundle import INDEX_FILE, save_bundle
from phanes_cli.calibrate import calibrate_on_slices
from phanes_cli.config import PhanesConfig, StageTrainConfig
from phanes_cli.errors import ConfigError
from phanes_cli.models import SoftMaskDiscriminator, VGG16Perceptual
from phanes_cli.pipeline import binary_mask, stage1_map
from phanes_cli.training import losses
from phanes_cli.training.augment import augment
from phanes_cli.training.checkpoint import (
    flatten_optimizer,
    load_checkpoint,
    module_state,
    module_tensors,
    rng_restore,
    rng_snapshot,
    save_checkpoint,
    unflatten_optimizer,
)
from phanes_cli.training.data import SliceSet, epoch_batches, hash_seed, healthy_rows, load_slices, spread_subset
from phanes_cli.training.progress import format_losses, make_progress
from phanes_cli.training.shapes import random_training_masks

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.safetensors"
METRICS_FILE = "metrics.csv"
VAL_MAX_SLICES = 256  # validation runs on at most this many evenly spread slices: cheap, fixed, representative
EVAL_BATCH = 32
STAGE1_THRESHOLD_SLICES = 512  # enough brain pixels (~10^6) for a stable 99th percentile, at a fixed cost
SOFT_TARGET_SIGMA = 10.0 / 512.0  # AOT-GAN blurs the SM-GAN target with sigma 10 px at 512 px; fraction of the side
ARCHITECTURE_KEYS = ("ra", "aot", "preprocess")
METRIC_COLUMNS = ("stage", "epoch", "step", "loss_encoder", "loss_decoder", "rec", "kl", "fake", "reversed",
                  "loss_generator", "l1", "style", "perceptual", "adv", "loss_discriminator",
                  "val_loss", "best_val", "seconds")


@dataclass
class RunState:
    """Progress of a run; everything a resumed run needs besides tensors (stored as JSON)."""

    stage: int = 1
    epoch: int = 0  # completed epochs of the current stage
    step: int = 0  # optimisation steps of the current stage
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # validations since the last improvement
    seconds: float = 0.0  # training wall time over all sessions
    stage2_mask_threshold: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)  # one summary per finished stage

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_val"] = None if not math.isfinite(self.best_val) else self.best_val
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        data = dict(data)
        data["best_val"] = math.inf if data.get("best_val") is None else float(data["best_val"])
        return cls(**data)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): model initialisation depends only on the seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LiveBackend:
    """The pipeline's Backend protocol over networks still being trained (no grad, left trainable).

    `backends.TorchBackend` freezes every parameter it is given, which the trainer cannot allow.
    """

    name = "training"

    def __init__(self, networks: PhanesNetworks, device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.networks = networks
        self.device = device
        self._autocast = autocast

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        with self._autocast():
            return self.networks.ra.reconstruct(x).float()

    @torch.no_grad()
    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        with self._autocast():
            return self.networks.generator(masked, mask).float()

    @torch.no_grad()
    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self.networks.lpips(a, b).float()


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then each module's previous mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class Trainer:
    """All networks, optimisers and random streams of one run; one method per training step kind."""

    def __init__(self, config: PhanesConfig, device: torch.device, lpips_weights: str | None) -> None:
        self.config = config
        self.device = device
        seed_everything(config.train.seed)
        self.networks = PhanesNetworks(config, lpips_weights=lpips_weights).to(device)
        self.discriminator = SoftMaskDiscriminator(config.aot).to(device)
        self.vgg = VGG16Perceptual().to(device)
        ra = self.networks.ra
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "encoder": torch.optim.Adam(ra.encoder.parameters(), lr=config.train.stage1.lr),
            "decoder": torch.optim.Adam(ra.decoder.parameters(), lr=config.train.stage1.lr),
            "generator": torch.optim.Adam(self.networks.generator.parameters(), lr=config.train.stage2.lr),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=config.train.stage2.lr),
        }
        self.sampler = torch.Generator().manual_seed(hash_seed(config.train.seed, 7))
        self.intro = losses.IntroWeights()
        self.inpaint = losses.InpaintWeights()
        self.backend = LiveBackend(self.networks, device, self.autocast)
        self.networks.ra.train()
        self.networks.generator.train()
        self.discriminator.train()

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA, plain fp32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.sampler).to(self.device)

    def _sample(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + self._randn(*mu.shape) * torch.exp(0.5 * logvar.float())

    # stage 1 ------------------------------------------------------------------------------------
    def stage1_step(self, x: Tensor) -> dict[str, float]:
        """One Soft-IntroVAE step on (N, 1, S, S) slices: an encoder update, then a decoder update."""
        enc, dec = self.networks.ra.encoder, self.networks.ra.decoder
        x, _ = augment(x.to(self.device), x.new_zeros(x.shape[0], 0, *x.shape[-2:]).to(self.device), self.sampler)
        noise = self._randn(x.shape[0], self.config.ra.latent_dim)

        dec.requires_grad_(False)
        with self.autocast():
            mu, logvar, feats_x = enc(x, return_features=True)
            z = self._sample(mu, logvar)
            rec = dec(z)
            fake = dec(noise)
            mu_rr, logvar_rr, feats_rr = enc(rec.detach(), return_features=True)
            mu_ff, logvar_ff = enc(fake.detach())
            rec_rr = dec(self._sample(mu_rr, logvar_rr))
            rec_ff = dec(self._sample(mu_ff, logvar_ff))
        real = losses.RoundTrip(x, rec, mu, logvar)
        rr = losses.RoundTrip(rec.detach(), rec_rr, mu_rr, logvar_rr)
        ff = losses.RoundTrip(fake.detach(), rec_ff, mu_ff, logvar_ff)
        reversed_term = losses.reversed_embedding_loss(feats_x, feats_rr)
        loss_e, terms = losses.encoder_loss(real, rr, ff, reversed_term, self.intro)
        self.optimizers["encoder"].zero_grad(set_to_none=True)
        loss_e.backward()
        self.optimizers["encoder"].step()
        dec.requires_grad_(True)

        enc.requires_grad_(False)
        with self.autocast():
            rec = dec(z.detach())
            fake = dec(noise)
            mu_r, logvar_r = enc(rec)
            mu_f, logvar_f = enc(fake)
            rec_rr = dec(self._sample(mu_r, logvar_r).detach())
            rec_ff = dec(self._sample(mu_f, logvar_f).detach())
        real_rec = losses.reconstruction_error(x, rec)
        loss_d = losses.decoder_loss(real_rec, losses.RoundTrip(rec.detach(), rec_rr, mu_r, logvar_r),
                                     losses.RoundTrip(fake.detach(), rec_ff, mu_f, logvar_f), self.intro)
        self.optimizers["decoder"].zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizers["decoder"].step()
        enc.requires_grad_(True)
        return {"loss_encoder": float(loss_e.detach()), "loss_decoder": float(loss_d.detach()), **{k: float(v) for k, v in terms.items()}}

    @torch.no_grad()
    def stage1_validation(self, data: SliceSet) -> float:
        """Mean squared error per pixel of the deterministic reconstruction x_cph."""
        total, count = 0.0, 0
        with evaluating(self.networks.ra):
            for start in range(0, len(data), EVAL_BATCH):
                x = data.images[start : start + EVAL_BATCH].to(self.device)
                total += float((self.backend.reconstruct(x) - x).pow(2).sum())
                count += x.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def stage1_threshold(self, data: SliceSet) -> float:
        """The `mask_percentile` of stage 1 maps over the brain pixels of (up to STAGE1_THRESHOLD_SLICES evenly
        spread) healthy training slices: the level that binarises stage 1 maps into stage 2 training holes."""
        view = data.subset(spread_subset(len(data), STAGE1_THRESHOLD_SLICES))
        values: list[Tensor] = []
        with evaluating(self.networks.ra):
            for start in range(0, len(view), EVAL_BATCH):
                x = view.images[start : start + EVAL_BATCH].to(self.device)
                brain = view.brain[start : start + EVAL_BATCH].to(self.device)
                ra_map = stage1_map(x, self.backend.reconstruct(x), brain, self.backend, self.config.mask)
                values.append(ra_map[brain > 0].double().cpu())
        flat = torch.cat(values).numpy()
        return float(np.percentile(flat, self.config.mask.mask_percentile)) if flat.size else math.inf

    @torch.no_grad()
    def stage1_mask(self, x: Tensor, brain: Tensor, threshold: float) -> Tensor:
        """The inference-time stage 1 mask of (N, 1, S, S) slices (RA in eval mode), float {0, 1}."""
        with evaluating(self.networks.ra):
            ra_map = stage1_map(x, self.backend.reconstruct(x), brain, self.backend, self.config.mask)
        return binary_mask(ra_map, brain, threshold, self.config.mask)

    # stage 2 ------------------------------------------------------------------------------------
    def _perceptual_input(self, x: Tensor) -> Tensor:
        """(N, 1, S, S) -> the resolution the VGG losses run at (config.train.perceptual_size)."""
        size = self.config.train.perceptual_size
        if size is None or size == x.shape[-1]:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])

    def stage2_step(self, x: Tensor, brain: Tensor, threshold: float) -> dict[str, float]:
        """One AOT-GAN step on (N, 1, S, S) slices and brain masks.

        Holes = (stage 1 mask of the augmented slice at `threshold`, exactly as at inference) united with
        random shapes, inside the brain. The frozen stage 1 runs on the batch itself, so no mask has to be
        precomputed, stored or resampled.
        """
        gen, disc = self.networks.generator, self.discriminator
        x, brain = augment(x.to(self.device), brain.to(self.device), self.sampler)
        size = x.shape[-1]
        shapes = random_training_masks(x.shape[0], size, self.config.train.random_masks_per_image, self.sampler, self.device)
        m = torch.maximum(self.stage1_mask(x, brain, threshold), shapes) * brain

        disc.requires_grad_(False)
        with self.autocast():
            pred = gen(x * (1 - m) + m, m).float()
            comp = x * (1 - m) + pred * m
            feats_pred = self.vgg(self._perceptual_input(pred))
            with torch.no_grad():
                feats_x = self.vgg(self._perceptual_input(x))
            logits = disc(comp)
        m_small = F.interpolate(m, size=logits.shape[-2:], mode="area")
        adversarial = losses.generator_adversarial_loss(logits, m_small)
        loss_g, terms = losses.inpaint_generator_loss(pred, x, feats_pred, feats_x, adversarial, VGG16Perceptual.STYLE_LAYERS,
                                                      VGG16Perceptual.PERCEPTUAL_LAYERS, self.inpaint)
        self.optimizers["generator"].zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizers["generator"].step()
        disc.requires_grad_(True)

        with self.autocast():
            logits_fake = disc(comp.detach())
            logits_real = disc(x)
        target = losses.soft_mask_target(m, tuple(logits_fake.shape[-2:]), SOFT_TARGET_SIGMA * size)
        loss_d = losses.discriminator_loss(logits_fake, logits_real, target)
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizers["discriminator"].step()
        return {"loss_generator": float(loss_g.detach()), "loss_discriminator": float(loss_d.detach()), **{k: float(v) for k, v in terms.items()}}

    @torch.no_grad()
    def stage2_validation(self, data: SliceSet, holes: Tensor) -> float:
        """Mean absolute error of the composite inside fixed holes (N, 1, S, S)."""
        total, count = 0.0, 0.0
        with evaluating(self.networks.generator):
            for start in range(0, len(data), EVAL_BATCH):
                x = data.images[start : start + EVAL_BATCH].to(self.device)
                m = holes[start : start + EVAL_BATCH].to(self.device)
                comp = x * (1 - m) + self.backend.inpaint(x * (1 - m) + m, m) * m
                total += float(((comp - x).abs() * m).sum())
                count += float(m.sum())
        return total / max(count, 1.0)

    # checkpoints --------------------------------------------------------------------------------
    def save(self, path: Path, state: RunState) -> None:
        tensors = {**module_tensors("ra", self.networks.ra), **module_tensors("generator", self.networks.generator),
                   **module_tensors("discriminator", self.discriminator)}
        optim_meta: dict[str, Any] = {}
        for name, opt in self.optimizers.items():
            opt_tensors, optim_meta[name] = flatten_optimizer(name, opt)
            tensors.update(opt_tensors)
        rng_tensors, rng_meta = rng_snapshot(self.sampler)
        tensors.update(rng_tensors)
        save_checkpoint(path, tensors, {"state": state.to_json(), "optimizers": optim_meta, "rng": rng_meta,
                                        "config": self.config.to_dict()})

    def load(self, path: Path) -> RunState:
        tensors, meta = load_checkpoint(path)
        saved = meta["config"]
        changed = [k for k in ARCHITECTURE_KEYS if saved.get(k) != self.config.to_dict()[k]]
        if changed:
            raise ConfigError(f"{path}: the checkpoint was trained with different {', '.join(changed)} settings; "
                              "resume with the original config or train into another --out folder")
        self.networks.ra.load_state_dict(module_state("ra", tensors))
        self.networks.generator.load_state_dict(module_state("generator", tensors))
        self.discriminator.load_state_dict(module_state("discriminator", tensors))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(unflatten_optimizer(name, tensors, meta["optimizers"][name]))
        rng_restore(tensors, meta["rng"], self.sampler)
        return RunState.from_json(meta["state"])


class MetricsLog:
    """`metrics.csv`: one row per validation event, appended as training goes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop rows a killed session logged after its last checkpoint (they will be logged again)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if (int(r["stage"]), int(r["step"])) <= (stage, step)]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in METRIC_COLUMNS})


class _Averages:
    """Running means of the step losses since the last validation."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out must be a folder, and this is a file")
    if resume:
        return
    if (out / INDEX_FILE).exists():
        raise ConfigError(f"{out}: already holds a trained model bundle; pass --resume to continue/finish that run, "
                          "or choose another --out folder (a finished model is never overwritten)")
    if (out / CHECKPOINT_DIR / LAST_CHECKPOINT).exists():
        raise ConfigError(f"{out}: holds an unfinished training run; pass --resume to continue it or choose another --out folder")


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


def _run_stage(spec: _Stage, trainer: Trainer, state: RunState, n_train: int, out: Path, metrics: MetricsLog,
               bar: Progress, session_start: float) -> None:
    """Epoch loop with validation, early stopping, best-weight tracking and checkpoints; ends the stage."""
    cfg = trainer.config.train
    sched = spec.schedule
    ckpt_dir = out / CHECKPOINT_DIR
    best_path = ckpt_dir / f"best_stage{spec.number}.safetensors"
    per_epoch = len(epoch_batches(n_train, cfg.batch_size, cfg.seed, spec.number, 0))
    total = per_epoch * sched.max_epochs if sched.max_steps is None else min(per_epoch * sched.max_epochs, sched.max_steps)
    task = bar.add_task(f"stage {spec.number} ({spec.name})", total=total, completed=state.step, info="")
    averages = _Averages()

    def capped() -> bool:
        return state.epoch >= sched.max_epochs or (sched.max_steps is not None and state.step >= sched.max_steps)

    if capped() and state.best_step < 0:
        raise ConfigError(f"train.stage{spec.number}: max_epochs/max_steps allow no training step")
    while not capped() and state.bad_evals < sched.patience:
        for index in epoch_batches(n_train, cfg.batch_size, cfg.seed, spec.number, state.epoch):
            if sched.max_steps is not None and state.step >= sched.max_steps:
                break
            values = spec.step(index)
            state.step += 1
            averages.add(values)
            bar.update(task, completed=state.step, info=format_losses(values, spec.shown))
        state.epoch += 1
        if state.epoch % sched.val_every == 0 or capped():
            val = spec.validate()
            if not math.isfinite(val):
                raise FloatingPointError(f"stage {spec.number}: validation loss is {val} at step {state.step}")
            if val < state.best_val:
                state.best_val, state.best_step, state.bad_evals = val, state.step, 0
                tensors = {k: v for name, module in spec.best_modules.items() for k, v in module_tensors(name, module).items()}
                with atomic_path(best_path) as tmp:
                    save_file(tensors, str(tmp))
            else:
                state.bad_evals += 1
            metrics.append({"stage": spec.number, "epoch": state.epoch, "step": state.step, **averages.means(),
                            "val_loss": val, "best_val": state.best_val,
                            "seconds": state.seconds + time.perf_counter() - session_start})
            averages = _Averages()
        if state.epoch % cfg.checkpoint_every == 0 and not capped() and state.bad_evals < sched.patience:
            _checkpoint(trainer, state, out, session_start)
    if state.bad_evals >= sched.patience:
        reason = "early_stopping"
    elif sched.max_steps is not None and state.step >= sched.max_steps:
        reason = "max_steps"
    else:
        reason = "max_epochs"
    best = load_file(str(best_path))
    for name, module in spec.best_modules.items():
        module.load_state_dict(module_state(name, best))
    state.stages.append({"stage": spec.number, "steps": state.step, "epochs": state.epoch, "best_val": state.best_val,
                         "best_step": state.best_step, "stopped_by": reason})
    state.stage, state.epoch, state.step = spec.number + 1, 0, 0
    state.best_val, state.best_step, state.bad_evals = math.inf, -1, 0
    _checkpoint(trainer, state, out, session_start)
    bar.update(task, info=f"best val {state.stages[-1]['best_val']:.4g} ({reason})")


def _checkpoint(trainer: Trainer, state: RunState, out: Path, session_start: float) -> None:
    now = time.perf_counter()
    saved = RunState.from_json(state.to_json())
    saved.seconds = state.seconds + now - session_start
    trainer.save(out / CHECKPOINT_DIR / LAST_CHECKPOINT, saved)


def train(config: PhanesConfig, manifest: Path, out: Path, resume: bool = False, device: str = "auto",
          lpips_weights: str | None = None, progress: bool = True) -> Path:
    """Train both stages on the healthy train split, keep the best weights, write and calibrate the bundle.

    Returns the bundle folder (`out`). `resume=True` continues from `out/checkpoints/last.safetensors`.
    """
    out = Path(out)
    manifest = Path(manifest)
    _check_out(out, resume)
    dev = select_device(device)
    train_rows = healthy_rows(manifest, "train")
    val_rows = healthy_rows(manifest, "val")
    ckpt_path = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    metrics = MetricsLog(out / METRICS_FILE)
    with make_progress(progress) as bar:
        train_set = load_slices(train_rows, config.preprocess, bar, "loading training volumes")
        val_set = load_slices(val_rows, config.preprocess, bar, "loading validation volumes")
        for name, data in (("train", train_set), ("val", val_set)):
            if len(data) == 0:
                raise ConfigError(f"{manifest}: the healthy {name!r} volumes hold no brain slices")
        trainer = Trainer(config, dev, lpips_weights)
        out.mkdir(parents=True, exist_ok=True)
        if resume and ckpt_path.is_file():
            state = trainer.load(ckpt_path)
            metrics.truncate_after(state.stage, state.step)
            bar.console.print(f"resuming {out}: stage {min(state.stage, 2)}, epoch {state.epoch}, step {state.step}")
        else:
            if resume:
                bar.console.print(f"no checkpoint in {out / CHECKPOINT_DIR}: starting a new run")
            state = RunState()
            metrics.reset()
        session_start = time.perf_counter()
        val_view = val_set.subset(spread_subset(len(val_set), VAL_MAX_SLICES))
        if state.stage == 1:
            stage1 = _Stage(1, "RA", config.train.stage1,
                            step=lambda idx: trainer.stage1_step(train_set.images[idx]),
                            validate=lambda: trainer.stage1_validation(val_view),
                            best_modules={"ra": trainer.networks.ra},
                            shown=("loss_encoder", "loss_decoder", "rec", "kl"))
            _run_stage(stage1, trainer, state, len(train_set), out, metrics, bar, session_start)
        if state.stage == 2:
            threshold = trainer.stage1_threshold(train_set)
            state.stage2_mask_threshold = threshold
            val_gen = torch.Generator().manual_seed(hash_seed(config.train.seed, 2, len(val_view)))
            holes = random_training_masks(len(val_view), config.preprocess.image_size,
                                          config.train.random_masks_per_image, val_gen) * val_view.brain
            stage2 = _Stage(2, "AOT-GAN", config.train.stage2,
                            step=lambda idx: trainer.stage2_step(train_set.images[idx], train_set.brain[idx], threshold),
                            validate=lambda: trainer.stage2_validation(val_view, holes),
                            best_modules={"generator": trainer.networks.generator},
                            shown=("loss_generator", "loss_discriminator", "l1", "adv"))
            _run_stage(stage2, trainer, state, len(train_set), out, metrics, bar, session_start)
        summary = {"stages": state.stages, "seed": config.train.seed, "device": str(dev),
                   "train_volumes": len(train_rows), "train_slices": len(train_set),
                   "val_volumes": len(val_rows), "val_slices": len(val_set),
                   "stage2_mask_threshold": state.stage2_mask_threshold,
                   "seconds": state.seconds + time.perf_counter() - session_start}
        trainer.networks.eval()
        save_bundle(out, config, trainer.networks.ra, trainer.networks.generator, extra={"training": summary})
        calibrate_on_slices(out, val_set, dev, EVAL_BATCH, lpips_weights, bar, n_volumes=len(val_rows))
    return out
