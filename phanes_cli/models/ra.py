"""Stage 1 of PHANES: a Soft-IntroVAE with residual blocks (method.md "Stage 1").

The encoder's stage outputs are exposed for the reversed embedding similarity loss; the decoder's
output at the posterior mean is the coarse pseudo-healthy reconstruction x_cph.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from phanes_cli.config import RAConfig

_NUM_DOWNSAMPLINGS = 5  # the stem pool + one pool per residual stage: 128 px -> 4 px


def _bottom_size(image_size: int) -> int:
    if image_size % (2**_NUM_DOWNSAMPLINGS) != 0:
        raise ValueError(f"image_size must be a multiple of {2**_NUM_DOWNSAMPLINGS}, got {image_size}")
    return image_size // 2**_NUM_DOWNSAMPLINGS


class ResidualBlock(nn.Module):
    """conv3x3-BN-LReLU-conv3x3-BN plus a (1x1-projected when channels change) shortcut, then LReLU.

    (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class RAEncoder(nn.Module):
    """(N,1,S,S) in [0, 1] -> posterior mean and log-variance, each (N, latent_dim).

    Stem (5x5 conv + BN + LReLU + 2x avg-pool) then one residual block + 2x avg-pool per further
    channel width, a residual block at S/32 px and a linear layer to [mu, logvar]. The five stage
    outputs (after each pool: S/2 ... S/32 px) are the features of the reversed embedding loss.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        latent_dim: int = 128,
        image_size: int = 128,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != _NUM_DOWNSAMPLINGS:
            raise ValueError(f"channels must list {_NUM_DOWNSAMPLINGS} widths, got {list(channels)}")
        self.latent_dim = latent_dim
        bottom = _bottom_size(image_size)
        stages: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, channels[0], 5, padding=2, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.LeakyReLU(0.2, inplace=True),
                nn.AvgPool2d(2),
            )
        ]
        for c_in, c_out in itertools.pairwise(channels):
            stages.append(nn.Sequential(ResidualBlock(c_in, c_out), nn.AvgPool2d(2)))
        self.stages = nn.ModuleList(stages)
        self.bottom = ResidualBlock(channels[-1], channels[-1])
        self.fc = nn.Linear(channels[-1] * bottom * bottom, 2 * latent_dim)

    def forward(
        self, x: Tensor, return_features: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[Tensor]]:
        features: list[Tensor] = []
        h = x
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        h = self.bottom(h)
        mu, logvar = self.fc(h.flatten(1)).chunk(2, dim=1)
        if return_features:
            return mu, logvar, features
        return mu, logvar


class RADecoder(nn.Module):
    """(N, latent_dim) -> (N,1,S,S) in [0, 1].

    Linear to channels[-1] x S/32 x S/32, one residual block + nearest 2x upsampling per width of the
    reversed channel list, a residual block at S px, a 5x5 conv and a sigmoid.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        latent_dim: int = 128,
        image_size: int = 128,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != _NUM_DOWNSAMPLINGS:
            raise ValueError(f"channels must list {_NUM_DOWNSAMPLINGS} widths, got {list(channels)}")
        self.bottom = _bottom_size(image_size)
        self.top_channels = channels[-1]
        self.fc = nn.Sequential(nn.Linear(latent_dim, channels[-1] * self.bottom * self.bottom), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        c_in = channels[-1]
        for c_out in reversed(channels):
            layers += [ResidualBlock(c_in, c_out), nn.Upsample(scale_factor=2, mode="nearest")]
            c_in = c_out
        layers += [ResidualBlock(c_in, c_in), nn.Conv2d(c_in, out_channels, 5, padding=2), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.top_channels, self.bottom, self.bottom)
        return self.body(h)


class SoftIntroVAE(nn.Module):
    """Encoder + decoder pair; the introspective losses live with the training code."""

    def __init__(self, cfg: RAConfig, image_size: int = 128) -> None:
        super().__init__()
        self.encoder = RAEncoder(cfg.channels, cfg.latent_dim, image_size)
        self.decoder = RADecoder(cfg.channels, cfg.latent_dim, image_size)

    def forward(self, x: Tensor, deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(N,1,S,S) -> (x_rec (N,1,S,S), mu (N,L), logvar (N,L)).

        deterministic=True decodes the posterior mean (reproducible screening); False decodes a
        reparameterised sample (training).
        """
        mu, logvar = self.encoder(x)
        z = mu if deterministic else mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_cph = D(mu(E(x))): (N,1,S,S) -> (N,1,S,S)."""
        mu, _ = self.encoder(x)
        return self.decoder(mu)
