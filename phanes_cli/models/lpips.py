"""Frozen perceptual networks: the spatial LPIPS map (mask generation, anomaly map, evaluation) and
VGG16 features (AOT-GAN style and perceptual losses). Both take grey images in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phanes_cli.errors import WeightsError
from phanes_cli.models.backbones import alexnet_features, vgg16_features
from phanes_cli.models.shipped_weights import lpips_heads

# LPIPS v0.1 input scaling (Zhang et al. 2018): inputs in [-1, 1] are shifted and scaled per channel.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_ALEX_TAPS = (1, 4, 7, 9, 11)  # indices of the five ReLUs in AlexNet `features` whose outputs LPIPS compares
_EPS = 1e-10


class _FrozenModule(nn.Module):
    """A fixed metric/feature network: always in eval mode (no dropout), no trainable parameters."""

    def train(self, mode: bool = True) -> _FrozenModule:
        return super().train(False)


class SpatialLPIPS(_FrozenModule):
    """LPIPS (AlexNet trunk, v0.1 linear heads) as a per-pixel map at the input resolution.

    Per tapped layer: unit-normalise each pixel's feature vector, square the difference of the two images,
    weight the channels by the calibrated linear head, upsample bilinearly to the input size; the map is
    the sum over layers. The ImageNet trunk comes from `backbones` and the heads from the shipped file.
    Gradients flow to the inputs (the parameters are frozen).
    """

    shift: Tensor  # LPIPS input scaling buffers, registered in __init__
    scale: Tensor

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.features = alexnet_features(weights_path)[: _ALEX_TAPS[-1] + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # the tapped outputs are kept; an in-place ReLU would overwrite them
        heads = lpips_heads()
        widths = [int(m.out_channels) for m in self.features if isinstance(m, nn.Conv2d)]
        self.heads = nn.ParameterList()
        for i, width in enumerate(widths):
            weight = heads.get(f"lin{i}.model.1.weight")
            if weight is None or tuple(weight.shape) != (1, width, 1, 1):
                raise WeightsError(f"LPIPS heads: lin{i}.model.1.weight missing or not (1, {width}, 1, 1)")
            self.heads.append(nn.Parameter(weight.float(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        h = (x - self.shift) / self.scale
        for index, module in enumerate(self.features):
            h = module(h)
            if index in _ALEX_TAPS:
                out.append(h / (torch.sqrt(torch.sum(h * h, dim=1, keepdim=True)) + _EPS))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(N,1,S,S) x2 in [0, 1] -> (N,1,S,S) non-negative LPIPS map."""
        size = a.shape[2:]
        taps_a = self._taps((a * 2.0 - 1.0).expand(-1, 3, -1, -1))
        taps_b = self._taps((b * 2.0 - 1.0).expand(-1, 3, -1, -1))
        total: Tensor | None = None
        for fa, fb, head in zip(taps_a, taps_b, self.heads, strict=True):
            layer = F.conv2d((fa - fb) ** 2, head)
            layer = F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
            total = layer if total is None else total + layer
        assert total is not None
        return total


_VGG16_RELU_NAMES: tuple[str, ...] = (
    "relu1_1", "relu1_2",
    "relu2_1", "relu2_2",
    "relu3_1", "relu3_2", "relu3_3",
    "relu4_1", "relu4_2", "relu4_3",
    "relu5_1", "relu5_2", "relu5_3",
)  # fmt: skip


class VGG16Perceptual(_FrozenModule):
    """VGG16 ReLU activations for the AOT-GAN style and perceptual losses.

    Deviation from method.md: VGG19 ImageNet weights are not available offline, so VGG16 stands in.
    Its analogues of the VGG19 layers are `STYLE_LAYERS` (relu2_2, relu3_3, relu4_3, relu5_2 for
    VGG19's relu2_2, 3_4, 4_4, 5_2: the last ReLU of blocks 2-4 and the second of block 5) and
    `PERCEPTUAL_LAYERS` (relu1_1 ... relu5_1, present in both networks). The forward returns every
    ReLU of VGG16 by name (`reluB_I`), so the losses pick what they need.
    """

    STYLE_LAYERS: tuple[str, ...] = ("relu2_2", "relu3_3", "relu4_3", "relu5_2")
    PERCEPTUAL_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    mean: Tensor  # ImageNet normalisation buffers, registered in __init__
    std: Tensor

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        features = vgg16_features(weights_path)
        last_relu = max(i for i, m in enumerate(features) if isinstance(m, nn.ReLU))
        self.features = features[: last_relu + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # every ReLU output is returned, a later in-place op would overwrite it
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N,1,S,S) in [0, 1] -> {"relu1_1": (N,64,S,S), ..., "relu5_3": (N,512,S/16,S/16)}."""
        h = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        out: dict[str, Tensor] = {}
        names = iter(_VGG16_RELU_NAMES)
        for module in self.features:
            h = module(h)
            if isinstance(module, nn.ReLU):
                out[next(names)] = h
        return out
