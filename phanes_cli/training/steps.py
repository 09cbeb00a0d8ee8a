"""The optimisation steps of both stages: all networks, optimisers and the run's random stream.

Stage 1 is Soft-IntroVAE with the reversed embedding: an encoder update, then a decoder update, on the
same augmented batch. Stage 2 is AOT-GAN: holes = the frozen stage 1's inference-time mask of the
augmented batch united with random shapes, inside the brain; a generator update, then a discriminator
update. As in AOT-GAN and the reference, the L1/style/perceptual terms compare the raw generator output
with the image and the adversarial term judges the composite; unlike the reference, the generator's
adversarial term is back-propagated.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phanes_cli.config import PhanesConfig
from phanes_cli.core.ops import binary_mask
from phanes_cli.core.pipeline import stage1_map
from phanes_cli.models import SoftMaskDiscriminator, VGG16Perceptual
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, bf16_autocast
from phanes_cli.training import losses
from phanes_cli.training.augment import augment
from phanes_cli.training.data import hash_seed
from phanes_cli.training.holes import random_training_masks

SOFT_TARGET_SIGMA = 10.0 / 512.0  # AOT-GAN blurs the SM-GAN target with sigma 10 px at 512 px; fraction of the side


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): model initialisation depends only on the seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then each module's previous mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


class Learner:
    """What the optimisation changes: networks, discriminator, optimisers and the seeded sampler of a run."""

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
        self.backend = TorchBackend(self.networks, device, trainable=True)
        self.networks.ra.train()
        self.networks.generator.train()
        self.discriminator.train()

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by checkpoint prefix."""
        return {"ra": self.networks.ra, "generator": self.networks.generator, "discriminator": self.discriminator}

    def autocast(self) -> AbstractContextManager[Any]:
        return bf16_autocast(self.device)

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.sampler).to(self.device)

    def _sample(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + self._randn(*mu.shape) * torch.exp(0.5 * logvar.float())

    def _update(self, name: str, loss: Tensor) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers[name].step()

    # stage 1 ------------------------------------------------------------------------------------
    def stage1_step(self, x: Tensor) -> dict[str, float]:
        """One Soft-IntroVAE step on (N, 1, S, S) slices: an encoder update, then a decoder update."""
        x, _ = augment(x.to(self.device), x.new_zeros(x.shape[0], 0, *x.shape[-2:]).to(self.device), self.sampler)
        noise = self._randn(x.shape[0], self.config.ra.latent_dim)
        loss_e, z, terms = self._encoder_update(x, noise)
        loss_d = self._decoder_update(x, z, noise)
        return {"loss_encoder": float(loss_e.detach()), "loss_decoder": float(loss_d.detach()),
                **{k: float(v) for k, v in terms.items()}}

    def _encoder_update(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Encoder half of Eq. 2 (decoder frozen); returns its loss, the sampled latents and the loss terms."""
        enc, dec = self.networks.ra.encoder, self.networks.ra.decoder
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
        self._update("encoder", loss_e)
        dec.requires_grad_(True)
        return loss_e, z, terms

    def _decoder_update(self, x: Tensor, z: Tensor, noise: Tensor) -> Tensor:
        """Decoder half of Eq. 2 (encoder frozen) on the encoder half's latents and noise."""
        enc, dec = self.networks.ra.encoder, self.networks.ra.decoder
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
        self._update("decoder", loss_d)
        enc.requires_grad_(True)
        return loss_d

    @torch.no_grad()
    def stage1_mask(self, x: Tensor, brain: Tensor, threshold: float) -> Tensor:
        """The inference-time stage 1 mask of (N, 1, S, S) slices (RA in eval mode), float {0, 1}."""
        with evaluating(self.networks.ra):
            m = stage1_map(x, self.backend.reconstruct(x), brain, self.backend, self.config.mask)
        return binary_mask(m, brain, threshold, self.config.mask)

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
        x, brain = augment(x.to(self.device), brain.to(self.device), self.sampler)
        shapes = random_training_masks(x.shape[0], x.shape[-1], self.config.train.random_masks_per_image, self.sampler,
                                       self.device)
        m = torch.maximum(self.stage1_mask(x, brain, threshold), shapes) * brain
        loss_g, comp, terms = self._generator_update(x, m)
        loss_d = self._discriminator_update(x, m, comp)
        return {"loss_generator": float(loss_g.detach()), "loss_discriminator": float(loss_d.detach()),
                **{k: float(v) for k, v in terms.items()}}

    def _generator_update(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Generator update (discriminator frozen); returns its loss, the composite and the loss terms."""
        gen, disc = self.networks.generator, self.discriminator
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
        loss_g, terms = losses.inpaint_generator_loss(pred, x, feats_pred, feats_x, adversarial,
                                                      VGG16Perceptual.STYLE_LAYERS, VGG16Perceptual.PERCEPTUAL_LAYERS,
                                                      self.inpaint)
        self._update("generator", loss_g)
        disc.requires_grad_(True)
        return loss_g, comp, terms

    def _discriminator_update(self, x: Tensor, m: Tensor, comp: Tensor) -> Tensor:
        """Soft-mask discriminator update: the composite's painted region is fake, the real image is real."""
        disc = self.discriminator
        with self.autocast():
            logits_fake = disc(comp.detach())
            logits_real = disc(x)
        target = losses.soft_mask_target(m, tuple(logits_fake.shape[-2:]), SOFT_TARGET_SIGMA * x.shape[-1])
        loss_d = losses.discriminator_loss(logits_fake, logits_real, target)
        self._update("discriminator", loss_d)
        return loss_d
