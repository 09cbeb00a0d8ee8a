"""Stage 2 of PHANES: the AOT-GAN inpainting generator and its soft-mask discriminator (method.md "Stage 2")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from phanes_cli.config import AOTConfig


def _spatial_standardise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample, per-channel zero mean / unit variance over H, W (the gate's layer norm)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def _padded_conv3x3(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """Reflect-padded 3x3 conv that keeps the spatial size at any dilation."""
    return nn.Sequential(nn.ReflectionPad2d(dilation), nn.Conv2d(in_channels, out_channels, 3, dilation=dilation))


class AOTBlock(nn.Module):
    """Aggregated contextual transformation: (N,C,H,W) -> (N,C,H,W).

    Parallel dilated 3x3 branches (C -> C/len(rates) each, ReLU) are concatenated and fused by a 3x3
    conv; a learned spatial gate g = sigmoid(standardise(conv3x3(x))) blends it with the input:
    x * (1 - g) + fused * g, so every block can fall back to the identity where context does not help.
    """

    def __init__(self, channels: int, rates: Sequence[int] = (1, 2, 4, 8)) -> None:
        super().__init__()
        if channels % len(rates) != 0:
            raise ValueError(f"channels ({channels}) must be divisible by the number of rates ({len(rates)})")
        branch = channels // len(rates)
        self.branches = nn.ModuleList(
            nn.Sequential(_padded_conv3x3(channels, branch, rate), nn.ReLU(inplace=True)) for rate in rates
        )
        self.fuse = _padded_conv3x3(channels, channels)
        self.gate = _padded_conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        g = torch.sigmoid(_spatial_standardise(self.gate(x)))
        return x * (1.0 - g) + fused * g


class _UpConv(nn.Module):
    """Bilinear 2x upsampling then a 3x3 conv: (N,C_in,H,W) -> (N,C_out,2H,2W), without checkerboard artefacts."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class AOTGenerator(nn.Module):
    """Inpaints the holes of a masked grey image at 1/4 resolution through AOT blocks.

    Encoder 7x7 conv (2 -> base), 4x4 stride-2 convs (base -> 2 base -> channels); `blocks` AOT blocks;
    decoder two upconvs (channels -> 2 base -> base) and a 3x3 conv to 1 channel, tanh mapped to [0, 1].
    """

    def __init__(self, cfg: AOTConfig) -> None:
        super().__init__()
        base, mid = cfg.base_channels, 2 * cfg.base_channels
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(2, base, 7),
            nn.ReLU(inplace=True),
            nn.Conv2d(base, mid, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cfg.channels, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.middle = nn.Sequential(*(AOTBlock(cfg.channels, cfg.rates) for _ in range(cfg.blocks)))
        self.decoder = nn.Sequential(
            _UpConv(cfg.channels, mid),
            nn.ReLU(inplace=True),
            _UpConv(mid, base),
            nn.ReLU(inplace=True),
            nn.Conv2d(base, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, masked: Tensor, mask: Tensor) -> Tensor:
        """masked (N,1,S,S) = x*(1-m)+m, mask (N,1,S,S) in {0,1} -> inpainted (N,1,S,S) in [0, 1]; S divisible by 4."""
        h = self.encoder(torch.cat([masked, mask], dim=1))
        return (self.decoder(self.middle(h)) + 1.0) * 0.5


class SoftMaskDiscriminator(nn.Module):
    """Patch discriminator trained to predict the (soft) inpainting mask: (N,1,S,S) -> logits (N,1,h,w).

    Spectral-norm 4x4 convs with LReLU: stride 2 for all widths but the last, which has stride 1,
    then a stride-1 conv to one logit map (h = w = 14 at S = 128 with the paper's widths).
    """

    def __init__(self, cfg: AOTConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c_out in enumerate(cfg.disc_channels):
            stride = 1 if i == len(cfg.disc_channels) - 1 else 2
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        layers.append(spectral_norm(nn.Conv2d(c_in, 1, 4, 1, 1)))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
