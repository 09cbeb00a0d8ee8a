"""Training: loss definitions, augmentation, random masks, data order, end-to-end training and resume."""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.cli import app
from phanes_cli.config import StageTrainConfig, config_from_dict
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.pipeline import stage1_map
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import load_mask, load_volume
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, load_networks
from phanes_cli.training import losses, validation
from phanes_cli.training.augment import AffineParams, apply_affine, augment, sampling_matrices
from phanes_cli.training.data import epoch_batches
from phanes_cli.training.holes import random_ellipses, random_training_masks
from phanes_cli.training.options import TrainOptions
from phanes_cli.training.steps import Learner, evaluating
from phanes_cli.training.trainer import train
from tests._tiny_cohort import tiny_config, write_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


# losses -----------------------------------------------------------------------------------------

def test_kl_and_reconstruction_match_their_definitions() -> None:
    assert torch.allclose(losses.kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, -1.0]])
    expected = 0.5 * sum(math.exp(lv) + m * m - 1 - lv for m, lv in zip([1.0, -2.0], [0.5, -1.0], strict=True))
    assert losses.kl_divergence(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    x, y = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    assert torch.allclose(losses.reconstruction_error(x, y), ((x - y) ** 2).sum(dim=(1, 2, 3)))


def test_reversed_embedding_is_zero_for_identical_features_and_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s, generator=gen) for c, s in ((4, 8), (8, 4), (8, 2))]
    assert losses.reversed_embedding_loss(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-6)
    other = [f + 0.3 * torch.randn(f.shape, generator=gen) for f in feats]
    expected = 0.0
    for a, b in zip(feats, other, strict=True):
        a2, b2 = a.flatten(1).numpy().astype(np.float64), b.flatten(1).numpy().astype(np.float64)
        cos = (a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))
        expected += (1 - cos.mean()) + 0.5 * ((a2 - b2) ** 2).mean()
    assert losses.reversed_embedding_loss(feats, other).item() == pytest.approx(expected, rel=1e-5)


def _round_trip(gen: torch.Generator, n: int = 3, size: int = 8, latent: int = 4) -> losses.RoundTrip:
    return losses.RoundTrip(torch.rand(n, 1, size, size, generator=gen), torch.rand(n, 1, size, size, generator=gen),
                            torch.randn(n, latent, generator=gen), 0.5 * torch.randn(n, latent, generator=gen))


def _np_terms(rt: losses.RoundTrip) -> tuple[np.ndarray, np.ndarray]:
    t, r = rt.target.double().numpy(), rt.reconstruction.double().numpy()
    mu, lv = rt.mu.double().numpy(), rt.logvar.double().numpy()
    rec = ((t - r) ** 2).reshape(len(t), -1).sum(1)
    kl = 0.5 * (np.exp(lv) + mu**2 - 1 - lv).sum(1)
    return rec, kl


def test_encoder_and_decoder_losses_follow_method_constants() -> None:
    """Recompute Eq. 2 with method.md's constants (s = 1/(H*W), b_rec .5, b_kl 1, b_neg 128, gamma_r 1e-8)."""
    gen = torch.Generator().manual_seed(1)
    real, rr, ff = _round_trip(gen), _round_trip(gen), _round_trip(gen)
    s = 1.0 / 64.0
    rec, kl = _np_terms(real)
    rec_rr, kl_rr = _np_terms(rr)
    rec_ff, kl_ff = _np_terms(ff)
    reversed_term = torch.tensor(0.7)
    expected_e = (s * (0.5 * rec + 1.0 * kl)).mean() + 0.25 * (
        np.exp(-2 * s * (0.5 * rec_rr + 128 * kl_rr)).mean() + np.exp(-2 * s * (0.5 * rec_ff + 128 * kl_ff)).mean()
    ) + 0.005 * 0.7
    loss_e, terms = losses.encoder_loss(real, rr, ff, reversed_term)
    assert loss_e.item() == pytest.approx(expected_e, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.mean(), rel=1e-5)
    expected_d = (s * (0.5 * rec + 0.5 * (kl_rr + kl_ff) + 0.5 * 1e-8 * 0.5 * (rec_rr + rec_ff))).mean()
    loss_d = losses.decoder_loss(torch.from_numpy(rec).float(), rr, ff)
    assert loss_d.item() == pytest.approx(expected_d, rel=1e-5)


def test_stage1_step_on_fixed_batch_has_finite_structured_losses_and_updates_both_players() -> None:
    cfg = tiny_config()
    trainer = Learner(cfg, torch.device("cpu"), None)
    size = cfg.preprocess.image_size
    x = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(3))
    enc_before = [p.detach().clone() for p in trainer.networks.ra.encoder.parameters()]
    dec_before = [p.detach().clone() for p in trainer.networks.ra.decoder.parameters()]
    values = trainer.stage1_step(x)
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["rec"] > 0
    assert values["kl"] >= 0
    assert values["reversed"] >= 0
    assert 0 < values["fake"] <= 0.5  # 0.25 * (two exponentials of non-positive arguments)
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, trainer.networks.ra.encoder.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(dec_before, trainer.networks.ra.decoder.parameters(), strict=True))


def test_trainable_backend_computes_what_the_frozen_one_does_and_leaves_the_networks_trainable() -> None:
    """The trainer's backend must not freeze what it trains, and its outputs must be usable in a backward pass
    (stage 2 holes multiply the generator input); the frozen inference backend gives the same numbers (to the
    last bits: it runs channels-last convolutions on the CPU, which sum in another order)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    live = PhanesNetworks(cfg).train()
    still = copy.deepcopy(live)
    trainable = TorchBackend(live, torch.device("cpu"), trainable=True)
    frozen = TorchBackend(still, torch.device("cpu"))
    size = cfg.preprocess.image_size
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(4))
    with evaluating(live.ra):
        mine = trainable.reconstruct(x)
    torch.testing.assert_close(mine, frozen.reconstruct(x), rtol=1e-5, atol=1e-6)
    assert live.training
    assert all(p.requires_grad for p in live.ra.parameters())
    assert not still.training
    assert not any(p.requires_grad for p in still.parameters())
    (mine * live.ra.reconstruct(x)).sum().backward()
    assert all(p.grad is not None for p in live.ra.decoder.parameters())
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (frozen.reconstruct(x) * live.ra.reconstruct(x)).sum().backward()


def test_inpainting_losses() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = {"a": torch.rand(2, 3, 4, 4, generator=gen), "b": torch.rand(2, 5, 2, 2, generator=gen)}
    assert losses.style_loss(feats, feats, ["a", "b"]).item() == 0.0
    assert losses.perceptual_loss(feats, feats, ["a", "b"]).item() == 0.0
    f = feats["a"]
    manual = torch.einsum("nchw,ndhw->ncd", f, f) / (3 * 4 * 4)
    assert torch.allclose(losses.gram(f), manual, atol=1e-6)
    # adversarial: nothing painted -> no generator signal; confident correct discriminator -> small loss
    logits = torch.randn(2, 1, 3, 3, generator=gen)
    assert losses.generator_adversarial_loss(logits, torch.zeros_like(logits)).item() == 0.0
    target = torch.zeros(2, 1, 3, 3)
    target[:, :, 1, 1] = 1.0
    good = losses.discriminator_loss(20 * (2 * target - 1), torch.full_like(target, -20.0), target)
    bad = losses.discriminator_loss(-20 * (2 * target - 1), torch.full_like(target, 20.0), target)
    assert good.item() < 1e-6 < 1.0 < bad.item()
    soft = losses.soft_mask_target(torch.ones(1, 1, 16, 16), (4, 4), sigma=2.0)
    assert soft.shape == (1, 1, 4, 4)
    assert torch.allclose(soft, torch.ones_like(soft), atol=1e-5)


# augmentation and masks ---------------------------------------------------------------------------

def _blob(size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.exp(-(((yy - 24.0) / 10) ** 2 + ((xx - 36.0) / 6) ** 2))
    img = img + 0.8 * torch.exp(-(((yy - 44.0) / 5) ** 2 + ((xx - 20.0) / 9) ** 2))
    return img.clamp(0, 1)[None, None].float()


def test_augment_keeps_image_and_mask_aligned() -> None:
    img = _blob().repeat(16, 1, 1, 1)
    mask = (img > 0.5).float()
    out_img, out_mask = augment(img, mask, torch.Generator().manual_seed(0))
    assert out_mask.shape == mask.shape
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_img, img)  # something moved
    agree = (out_mask == (out_img > 0.5).float()).float().mean().item()
    assert agree > 0.995
    # the moved masks still cover the moved blobs (areas roughly preserved by scales of 0.9-1.1)
    ratio = out_mask.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))
    assert bool(((ratio > 0.75) & (ratio < 1.3)).all())


def test_augment_flip_is_left_right_and_identity_is_exact() -> None:
    img = _blob()
    identity = AffineParams(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                            torch.tensor([False]))
    assert torch.allclose(apply_affine(img, sampling_matrices(identity)), img, atol=1e-5)
    flipped = dataclasses.replace(identity, flip=torch.tensor([True]))
    assert torch.allclose(apply_affine(img, sampling_matrices(flipped)), torch.flip(img, dims=[-2]), atol=1e-5)
    shifted = dataclasses.replace(identity, shift_x=torch.tensor([0.125], dtype=torch.float64))
    moved = apply_affine(img, sampling_matrices(shifted))  # +0.125 of 64 px = 8 px along dim -2
    assert torch.allclose(moved[..., 8:, :], img[..., :-8, :], atol=1e-5)


def test_augment_is_reproducible_from_the_seed() -> None:
    img = _blob().repeat(4, 1, 1, 1)
    a = augment(img, img > 0.5, torch.Generator().manual_seed(5))
    b = augment(img, img > 0.5, torch.Generator().manual_seed(5))
    c = augment(img, img > 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_random_ellipses_are_small_central_and_seeded() -> None:
    size = 128
    masks = random_ellipses(32, size, 10, torch.Generator().manual_seed(0))
    assert masks.shape == (32, 1, size, size)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    frac = masks.mean(dim=(1, 2, 3))
    assert bool((frac > 0.002).all())
    assert bool((frac < 0.25).all())
    reach = size / 4 - size / 12 - 1  # centres in the central half, semi-axes at most S/12
    rows = masks.amax(dim=(0, 1, 3)).nonzero().flatten()
    cols = masks.amax(dim=(0, 1, 2)).nonzero().flatten()
    assert rows.min() >= reach
    assert rows.max() < size - reach
    assert cols.min() >= reach
    assert cols.max() < size - reach
    again = random_training_masks(4, 64, 10, torch.Generator().manual_seed(1))
    assert torch.equal(again, random_training_masks(4, 64, 10, torch.Generator().manual_seed(1)))


def test_epoch_order_is_seeded_full_batches_without_repeats() -> None:
    a = epoch_batches(30, 8, seed=0, stage=1, epoch=0)
    assert [len(b) for b in a] == [8, 8, 8]
    flat = torch.cat(a)
    assert len(flat.unique()) == 24
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_batches(30, 8, seed=0, stage=1, epoch=0), strict=True))
    assert not torch.equal(torch.cat(epoch_batches(30, 8, 0, 1, 1)), flat)
    assert [len(b) for b in epoch_batches(5, 8, 0, 1, 0)] == [5]


# end to end ---------------------------------------------------------------------------------------

STEPS = 5  # with one training volume (20 model slices at batch 6 = 3 steps per epoch): two epochs per stage


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_train=1, n_val=1)


def _config():  # type: ignore[no-untyped-def]
    return tiny_config(STEPS, batch_size=6)


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained, then calibrated, as `phanes train` does (train() itself leaves the bundle uncalibrated)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train(TrainOptions(_config(), cohort, tmp_path_factory.mktemp("run") / "model", device="cpu",
                                 progress=False))
        with pytest.raises(BundleError, match="not calibrated"):
            load_bundle(out)
        calibrate(CalibrateOptions(manifest=cohort, bundle=out, device="cpu", progress=False))
        return out
    finally:
        torch.set_num_threads(before)


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_training_produces_a_verified_calibrated_bundle(trained: Path, cohort: Path) -> None:
    bundle = load_bundle(trained)
    cal = bundle.require_calibration()
    assert math.isfinite(cal.mask_threshold)
    assert cal.mask_threshold > 0
    assert math.isfinite(cal.anomaly_threshold)
    assert cal.anomaly_threshold > 0
    assert cal.n_volumes == 1
    assert cal.n_slices > 0
    stages = bundle.versions["training"]["stages"]
    assert [s["stage"] for s in stages] == [1, 2]
    assert all(s["steps"] == STEPS for s in stages)
    rows = _metrics(trained)
    assert [(r["stage"], r["step"]) for r in rows] == [("1", "3"), ("1", "5"), ("2", "3"), ("2", "5")]
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)
    # the bundle holds the best validation weights of each stage
    best1 = min(rows[:2], key=lambda r: float(r["val_loss"]))
    assert stages[0]["best_step"] == int(best1["step"])
    ra = load_file(str(trained / "checkpoints" / "best_stage1.safetensors"))
    assert ra.keys() == {f"ra.{k}" for k in bundle.ra_state}
    assert all(torch.equal(bundle.ra_state[k.removeprefix("ra.")], v) for k, v in ra.items())
    # a finished model is never overwritten silently
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainOptions(_config(), cohort, trained, device="cpu", progress=False))


def test_stage2_holes_use_the_calibration_percentile_of_the_trained_stage1(trained: Path, cohort: Path) -> None:
    """The stored stage 2 mask threshold is the mask percentile of the final RA's stage 1 maps over the brain
    pixels of the (here: all 20) healthy training slices, recomputed with a frozen backend in one batch."""
    bundle = load_bundle(trained)
    cfg = bundle.config
    row = next(r for r in read_manifest(cohort) if r.split == "train")
    volume = load_volume(row.image)
    prepared = prepare_volume(volume.data, load_mask(row.brain_mask, volume), cfg.preprocess, volume.zooms)
    x, brain = prepared.slices, prepared.brain
    backend = TorchBackend(load_networks(bundle), torch.device("cpu"))
    with torch.no_grad():
        ra_map = stage1_map(x, backend.networks.ra.reconstruct(x), brain, backend, cfg.mask)
    expected = float(np.percentile(ra_map[brain > 0].double().numpy(), cfg.mask.mask_percentile))
    assert bundle.versions["training"]["stage2_mask_threshold"] == pytest.approx(expected, rel=1e-5)


def test_stage1_from_keeps_that_ra_and_cuts_holes_at_the_hole_percentile(trained: Path, cohort: Path,
                                                                           tmp_path: Path) -> None:
    """--stage1-from: stage 2 alone, on the other bundle's RA unchanged; holes at train.hole_percentile of that RA's
    maps over the training slices (recomputed here with numpy's percentile), not at the mask percentile."""
    base = _config()
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, hole_percentile=80.0))
    out = train(TrainOptions(config, cohort, tmp_path / "model", device="cpu", progress=False, stage1_from=trained))
    first, second = load_bundle(trained), load_bundle(out, require_calibration=False)
    assert all(torch.equal(first.ra_state[k], v) for k, v in second.ra_state.items())
    stages = second.versions["training"]["stages"]
    assert stages[0]["from_bundle"] == str(trained.resolve()) and stages[0]["bundle_hash"] == first.hash
    assert [s["stage"] for s in stages] == [1, 2] and stages[1]["steps"] == STEPS
    assert [r["stage"] for r in _metrics(out)] == ["2", "2"]  # no stage 1 step was taken
    row = next(r for r in read_manifest(cohort) if r.split == "train")
    volume = load_volume(row.image)
    prepared = prepare_volume(volume.data, load_mask(row.brain_mask, volume), config.preprocess, volume.zooms)
    backend = TorchBackend(load_networks(second), torch.device("cpu"))
    with torch.no_grad():
        x, brain = prepared.slices, prepared.brain
        ra_map = stage1_map(x, backend.networks.ra.reconstruct(x), brain, backend, config.mask)
    expected = float(np.percentile(ra_map[brain > 0].double().numpy(), 80.0))
    # one batch here, the trainer's batches there: oneDNN rounds the two compositions apart
    assert second.versions["training"]["stage2_mask_threshold"] == pytest.approx(expected, rel=1e-3)
    assert expected < first.versions["training"]["stage2_mask_threshold"]  # 80th below the 99th: larger holes
    other = dataclasses.replace(base, ra=dataclasses.replace(base.ra, latent_dim=4))
    for source, message in ((trained, "ra settings differ"), (trained / "bundle.json", "not a model bundle folder")):
        with pytest.raises(ConfigError, match=message):  # refused before any data is read or folder made
            train(TrainOptions(other, cohort, tmp_path / "other", device="cpu", progress=False, stage1_from=source))
        assert not (tmp_path / "other").exists()


def test_missing_healthy_split_is_a_config_error(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, n_train=1, n_val=0)
    with pytest.raises(ConfigError, match="'val'"):
        train(TrainOptions(tiny_config(), manifest, tmp_path / "model", device="cpu", progress=False))


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, method: str, calls: int) -> None:
    original = getattr(Learner, method)
    count = {"n": 0}

    def wrapper(self: Learner, *args: object) -> dict[str, float]:
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Learner, method, wrapper)


def test_resume_after_kills_matches_the_uninterrupted_run(trained: Path, cohort: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    with monkeypatch.context() as patch:  # killed inside stage 1's second epoch (checkpoint at step 3)
        _interrupt_after(patch, "stage1_step", 4)
        with pytest.raises(KeyboardInterrupt):
            train(TrainOptions(_config(), cohort, out, device="cpu", progress=False))
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainOptions(_config(), cohort, out, device="cpu", progress=False))
    with monkeypatch.context() as patch:  # resumed, then killed inside stage 2
        _interrupt_after(patch, "stage2_step", 4)
        with pytest.raises(KeyboardInterrupt):
            train(TrainOptions(_config(), cohort, out, resume=True, device="cpu", progress=False))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(_config().to_dict()))
    finished = CliRunner().invoke(app, ["train", "--config", str(config_file), "--data", str(cohort), "--out", str(out),
                                        "--resume", "--device", "cpu"])
    assert finished.exit_code == 0, finished.output
    resumed, reference = load_bundle(out), load_bundle(trained)  # the command calibrated its bundle
    assert resumed.versions["training"]["stages"] == reference.versions["training"]["stages"]
    for mine, theirs in ((resumed.ra_state, reference.ra_state), (resumed.generator_state, reference.generator_state)):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), "resumed weights differ from the uninterrupted run"
    assert resumed.calibration == reference.calibration
    assert [(r["stage"], r["step"], r["val_loss"]) for r in _metrics(out)] == \
        [(r["stage"], r["step"], r["val_loss"]) for r in _metrics(trained)]


def test_early_stopping_keeps_the_best_validation_weights(cohort: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation losses that only get worse after the first epoch: each stage stops after `patience` more epochs."""
    for method in ("stage1_validation", "stage2_validation"):
        calls = {"n": 0}

        def rising(*args: object, calls: dict[str, int] = calls) -> float:
            calls["n"] += 1
            return float(calls["n"])

        monkeypatch.setattr(validation, method, rising)
    stage = StageTrainConfig(max_epochs=50, max_steps=None, lr=1e-3, patience=1, val_every=1)
    cfg = dataclasses.replace(_config(), train=dataclasses.replace(_config().train, stage1=stage, stage2=stage))
    out = train(TrainOptions(cfg, cohort, tmp_path / "model", device="cpu", progress=False))
    bundle = load_bundle(out, require_calibration=False)
    stages = bundle.versions["training"]["stages"]
    summaries = [(s["stopped_by"], s["epochs"], s["steps"], s["best_step"]) for s in stages]
    assert summaries == [("early_stopping", 2, 6, 3)] * 2
    gen = load_file(str(out / "checkpoints" / "best_stage2.safetensors"))
    assert all(torch.equal(bundle.generator_state[k.removeprefix("generator.")], v) for k, v in gen.items())
    last = load_file(str(out / "checkpoints" / "last.safetensors"))  # holds the final (worse) discriminator etc.
    assert any(k.startswith("optim.generator.") for k in last)


def test_resume_refuses_a_different_architecture(trained: Path, cohort: Path) -> None:
    other = dataclasses.replace(_config(), ra=dataclasses.replace(_config().ra, latent_dim=4))
    with pytest.raises(ConfigError, match="ra"):
        train(TrainOptions(other, cohort, trained, resume=True, device="cpu", progress=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast training path)")
def test_training_on_cuda(cohort: Path, tmp_path: Path) -> None:
    out = train(TrainOptions(_config(), cohort, tmp_path / "model", device="cuda", progress=False))
    calibrate(CalibrateOptions(manifest=cohort, bundle=out, device="cuda", progress=False))
    bundle = load_bundle(out)
    cal = bundle.require_calibration()
    assert bundle.versions["training"]["device"].startswith("cuda")
    assert math.isfinite(cal.mask_threshold)
    assert cal.mask_threshold > 0
    assert math.isfinite(cal.anomaly_threshold)
    assert cal.anomaly_threshold > 0


def test_training_writes_provenance_into_the_bundle(trained: Path, cohort: Path) -> None:
    """provenance.json: cohort (manifest hash, sources per split), seed, commit, time, each stage's validation."""
    import hashlib
    import json

    from phanes_cli.inputs.manifest import read_manifest

    bundle = load_bundle(trained)
    index = json.loads((trained / "bundle.json").read_text())["files"]
    assert "provenance.json" in index  # covered by the bundle's hashes like the weights
    prov = json.loads((trained / "provenance.json").read_text())
    rows = read_manifest(cohort)
    assert prov["cohort"]["manifest_sha256"] == hashlib.sha256(cohort.read_bytes()).hexdigest()
    for split in ("train", "val"):
        expected = sum(1 for r in rows if r.split == split and r.kind == "healthy")
        assert prov["cohort"][split]["volumes"] == expected == sum(prov["cohort"][split]["sources"].values())
    assert prov["seed"] == _config().train.seed
    assert prov["training"]["seconds"] == bundle.versions["training"]["seconds"] > 0
    assert prov["validation"]["stage2"]["best_val"] == bundle.versions["training"]["stages"][1]["best_val"]
    assert prov["source"] is None or len(prov["source"]["commit"]) == 40


def test_snapshots_keep_each_stages_weights_every_n_steps(cohort: Path, tmp_path: Path) -> None:
    """`train.snapshot_every`: the learning curve's points. Every 2 steps of each stage its live weights are written
    (stage 1: the RA, stage 2: the generator); the last stage 1 snapshot at its final step is what the bundle holds
    when that step's validation was the best."""
    cfg = dataclasses.replace(_config(), train=dataclasses.replace(_config().train, snapshot_every=2))
    out = train(TrainOptions(cfg, cohort, tmp_path / "model", device="cpu", progress=False))
    names = sorted(p.name for p in (out / "checkpoints").glob("stage*_step*.safetensors"))
    assert names == [f"stage{s}_step{k:06d}.safetensors" for s in (1, 2) for k in (2, 4)]
    bundle = load_bundle(out, require_calibration=False)
    for stage, prefix, state in ((1, "ra", bundle.ra_state), (2, "generator", bundle.generator_state)):
        snap = load_file(str(out / "checkpoints" / f"stage{stage}_step000004.safetensors"))
        assert snap.keys() == {f"{prefix}.{k}" for k in state}
        early = load_file(str(out / "checkpoints" / f"stage{stage}_step000002.safetensors"))
        assert any(not torch.equal(early[k], snap[k]) for k in snap)  # weights moved between the points
    with pytest.raises(ConfigError, match="snapshot_every"):
        config_from_dict({"train": {"snapshot_every": 0}})
