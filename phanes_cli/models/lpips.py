"""Frozen perceptual networks: the spatial LPIPS map (mask generation, anomaly map, evaluation) and
VGG16 features (AOT-GAN style and perceptual losses). Both take grey images in [0, 1]."""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn

from phanes_cli.errors import WeightsError
from phanes_cli.models.backbones import load_backbone_state_dict, vgg16_features

LPIPS_LINEAR_WEIGHTS = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


class _FrozenModule(nn.Module):
    """A fixed metric/feature network: always in eval mode (no dropout), no trainable parameters."""

    def train(self, mode: bool = True) -> _FrozenModule:
        return super().train(False)


class SpatialLPIPS(_FrozenModule):
    """LPIPS (AlexNet trunk, v0.1 linear layers) as a per-pixel map at the input resolution.

    The `lpips` package builds the network with a random trunk so it never downloads; the ImageNet
    AlexNet weights then come from `backbones.load_backbone_state_dict` and the calibrated linear
    layers from the file shipped in the `lpips` package, both read with ``weights_only=True``.
    Gradients flow to the inputs (the parameters are frozen).
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated `pretrained=` flag; harmless with pnet_rand=True.
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
            self.net = lpips.LPIPS(
                pretrained=False, net="alex", version="0.1", spatial=True, pnet_rand=True, verbose=False
            )
        trunk = load_backbone_state_dict("alexnet", weights_path)
        # lpips splits torchvision's `features` into slices but keeps each layer's index as its name.
        self.net.net.load_state_dict(
            {name: trunk[f"features.{name.split('.', 1)[1]}"] for name in self.net.net.state_dict()}, strict=True
        )
        if not LPIPS_LINEAR_WEIGHTS.is_file():
            raise WeightsError(
                f"{LPIPS_LINEAR_WEIGHTS}: LPIPS linear-layer weights missing; "
                "reinstall the package: pip install lpips==0.1.4"
            )
        linear = torch.load(LPIPS_LINEAR_WEIGHTS, map_location="cpu", weights_only=True)
        missing = [f"lin{i}.model.1.weight" for i in range(5) if f"lin{i}.model.1.weight" not in linear]
        if missing:
            raise WeightsError(f"{LPIPS_LINEAR_WEIGHTS}: not LPIPS AlexNet linear weights (missing {missing})")
        self.net.lins.load_state_dict({k.removeprefix("lin"): v for k, v in linear.items()}, strict=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(N,1,S,S) x2 in [0, 1] -> (N,1,S,S) non-negative LPIPS map."""
        a3 = (a * 2.0 - 1.0).expand(-1, 3, -1, -1)
        b3 = (b * 2.0 - 1.0).expand(-1, 3, -1, -1)
        return self.net(a3, b3)


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
