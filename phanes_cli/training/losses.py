"""Training losses of both PHANES stages (method.md, "Stage 1" and "Stage 2").

Stage 1 is Soft-IntroVAE with the reversed embedding similarity of the RA method: the encoder learns to
tell real images (low KL to the prior) from decoded ones (high KL), the decoder learns to fool it while
reconstructing real images. Stage 2 is AOT-GAN: L1 + style (Gram) + perceptual + an SM-GAN adversarial
term whose discriminator predicts the (blurred) inpainting mask.

Every loss is computed in float32 (callers cast autocast outputs): the exponential terms of the
introspective loss underflow or saturate in bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from phanes_cli.core import ops


@dataclass(frozen=True)
class IntroWeights:
    """Soft-IntroVAE constants (paper Eq. 2, values from the reference code via method.md).

    The scale s is 1 / (pixels per image), i.e. 1/(128*128) at the paper's size.
    """

    beta_rec: float = 0.5
    beta_kl: float = 1.0
    beta_neg: float = 128.0
    gamma_r: float = 1e-8
    fake_weight: float = 0.25  # 0.5 (mean of the two exponential terms) * 0.5 (1/alpha in Eq. 2)
    reversed_weight: float = 0.005


@dataclass(frozen=True)
class InpaintWeights:
    """AOT-GAN generator loss weights (method.md)."""

    l1: float = 1.0
    style: float = 250.0
    perceptual: float = 0.1
    adversarial: float = 0.01


@dataclass(frozen=True)
class RoundTrip:
    """One pass through the VAE for a loss: `target` decoded back as `reconstruction`, with its posterior.

    All image tensors (N, 1, S, S); mu and logvar (N, latent).
    """

    target: Tensor
    reconstruction: Tensor
    mu: Tensor
    logvar: Tensor

    def rec(self) -> Tensor:
        """(N,) summed squared error."""
        return reconstruction_error(self.target, self.reconstruction)

    def kl(self) -> Tensor:
        """(N,) KL of the posterior to N(0, I)."""
        return kl_divergence(self.mu, self.logvar)


def reconstruction_error(x: Tensor, y: Tensor) -> Tensor:
    """(N, ...) x2 -> (N,) squared error summed per image."""
    return (x.float() - y.float()).pow(2).flatten(1).sum(1)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """(N, D) x2 -> (N,) KL(N(mu, exp(logvar)) || N(0, I))."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(1)


def reversed_embedding_loss(features_x: Sequence[Tensor], features_rec: Sequence[Tensor]) -> Tensor:
    """Sum over encoder stages of (1 - cosine similarity) + 0.5 * MSE between features of x and of x_cph.

    Cosine similarity is taken per image over the flattened stage features and averaged over the batch;
    the MSE averages over all feature elements. Zero exactly when the two feature lists are identical.
    """
    if len(features_x) != len(features_rec):
        raise ValueError(f"feature lists differ in length: {len(features_x)} vs {len(features_rec)}")
    total = torch.zeros((), device=features_x[0].device)
    for a, b in zip(features_x, features_rec, strict=True):
        a, b = a.float().flatten(1), b.float().flatten(1)
        cosine = F.cosine_similarity(a, b, dim=1, eps=1e-8).mean()
        total = total + (1.0 - cosine) + 0.5 * F.mse_loss(a, b)
    return total


def _scale(x: Tensor) -> float:
    return 1.0 / float(x.shape[-2] * x.shape[-1])


def encoder_loss(real: RoundTrip, rr: RoundTrip, ff: RoundTrip, reversed_term: Tensor,
                 w: IntroWeights = IntroWeights()) -> tuple[Tensor, dict[str, Tensor]]:
    """Encoder objective: ELBO of real data, pushed-away KL of re-encoded reconstructions (rr) and fakes (ff).

    s*(b_rec*REC + b_kl*KL) + 0.25*[exp(-2s(b_rec*REC_rr + b_neg*KL_rr)) + exp(-2s(b_rec*REC_ff + b_neg*KL_ff))]
    + 0.005*L_reversed; batch means of per-image terms.
    """
    s = _scale(real.target)
    rec, kl = real.rec(), real.kl()
    elbo_real = s * (w.beta_rec * rec + w.beta_kl * kl)
    exp_rr = torch.exp(-2.0 * s * (w.beta_rec * rr.rec() + w.beta_neg * rr.kl()))
    exp_ff = torch.exp(-2.0 * s * (w.beta_rec * ff.rec() + w.beta_neg * ff.kl()))
    fake_term = w.fake_weight * (exp_rr.mean() + exp_ff.mean())
    loss = elbo_real.mean() + fake_term + w.reversed_weight * reversed_term
    return loss, {"rec": rec.mean().detach(), "kl": kl.mean().detach(), "fake": fake_term.detach(),
                  "reversed": reversed_term.detach()}


def decoder_loss(real_rec: Tensor, rr: RoundTrip, ff: RoundTrip, w: IntroWeights = IntroWeights()) -> Tensor:
    """Decoder objective: s*(b_rec*REC + 0.5*b_kl*(KL_rr + KL_ff) + 0.5*gamma_r*b_rec*(REC_rr + REC_ff)).

    `real_rec` is the (N,) reconstruction error of real data; rr/ff posteriors come from the encoder
    applied to the decoder's outputs, so their KL gradient reaches the decoder.
    """
    s = _scale(rr.target)
    per_image = (w.beta_rec * real_rec + 0.5 * w.beta_kl * (rr.kl() + ff.kl())
                 + 0.5 * w.gamma_r * w.beta_rec * (rr.rec() + ff.rec()))
    return (s * per_image).mean()


def gram(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, C) Gram matrix normalised by C*H*W."""
    n, c, h, wdt = features.shape
    flat = features.float().reshape(n, c, h * wdt)
    return flat @ flat.transpose(1, 2) / float(c * h * wdt)


def style_loss(feats_a: Mapping[str, Tensor], feats_b: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    """Sum over `layers` of the L1 distance between Gram matrices."""
    zero = torch.zeros((), device=feats_a[layers[0]].device)
    return sum((F.l1_loss(gram(feats_a[k]), gram(feats_b[k])) for k in layers), zero)


def perceptual_loss(feats_a: Mapping[str, Tensor], feats_b: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    """Sum over `layers` of the mean L1 distance between activations."""
    return sum((F.l1_loss(feats_a[k].float(), feats_b[k].float()) for k in layers),
               torch.zeros((), device=feats_a[layers[0]].device))


def soft_mask_target(mask: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """SM-GAN discriminator target for composites: the Gaussian-blurred mask at the logits' size.

    (N, 1, S, S) binary -> (N, 1, h, w) in [0, 1]; 1 = generated, 0 = real.
    """
    blurred = ops.gaussian_blur(mask.float(), sigma).clamp(0.0, 1.0)
    return F.interpolate(blurred, size=size, mode="area")


def discriminator_loss(logits_fake: Tensor, logits_real: Tensor, target_fake: Tensor) -> Tensor:
    """BCE of the discriminator: composites -> soft mask, real images -> 0 everywhere."""
    fake = F.binary_cross_entropy_with_logits(logits_fake.float(), target_fake)
    real = F.binary_cross_entropy_with_logits(logits_real.float(), torch.zeros_like(logits_real, dtype=torch.float32))
    return fake + real


def generator_adversarial_loss(logits_fake: Tensor, mask_small: Tensor) -> Tensor:
    """The generator wants its composites judged real (0) where it painted: BCE weighted by the mask.

    logits (N, 1, h, w); `mask_small` (N, 1, h, w), the inpainting mask at the logits' size. Normalised by
    the mean mask so the term does not shrink with small holes; zero when nothing was painted.
    """
    real = torch.zeros_like(logits_fake, dtype=torch.float32)
    per_pixel = F.binary_cross_entropy_with_logits(logits_fake.float(), real, reduction="none")
    weight = mask_small.float()
    return (per_pixel * weight).sum() / weight.sum().clamp_min(1e-6)


def inpaint_generator_loss(pred: Tensor, target: Tensor, feats_pred: Mapping[str, Tensor],
                           feats_target: Mapping[str, Tensor], adversarial: Tensor, style_layers: Sequence[str],
                           perceptual_layers: Sequence[str],
                           w: InpaintWeights = InpaintWeights()) -> tuple[Tensor, dict[str, Tensor]]:
    """L1 + 250*style + 0.1*perceptual + 0.01*adversarial; images (N, 1, S, S), VGG features by layer name."""
    l1 = F.l1_loss(pred.float(), target.float())
    style = style_loss(feats_pred, feats_target, style_layers)
    perceptual = perceptual_loss(feats_pred, feats_target, perceptual_layers)
    loss = w.l1 * l1 + w.style * style + w.perceptual * perceptual + w.adversarial * adversarial
    terms = {"l1": l1, "style": style, "perceptual": perceptual, "adv": adversarial}
    return loss, {k: v.detach() for k, v in terms.items()}
