"""The torch backend: the PHANES networks of a bundle in eager PyTorch, and the device they run on.

`core.backend.Backend` is the interface every backend implements; `select_device` picks CUDA when present,
else the CPU; `load_networks` builds a bundle's networks from its verified weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phanes_cli.config import PhanesConfig
from phanes_cli.core.bundle import WEIGHT_FILES, Bundle
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.models import AOTGenerator, SoftIntroVAE, SpatialLPIPS


def select_device(requested: str = "auto") -> torch.device:
    """'auto' -> CUDA if available else CPU; an explicit 'cuda' without a GPU is an error, not a silent CPU run."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    return device


class PhanesNetworks(nn.Module):
    """The inference networks of one model: stage 1 RA, stage 2 generator, and the LPIPS metric."""

    def __init__(self, cfg: PhanesConfig, lpips_weights: str | None = None) -> None:
        super().__init__()
        self.ra = SoftIntroVAE(cfg.ra, image_size=cfg.preprocess.image_size)
        self.generator = AOTGenerator(cfg.aot)
        self.lpips = SpatialLPIPS(weights_path=lpips_weights)


def fit_weights(module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load a bundle's `state` (read from `path`) into `module`; a BundleError naming the first tensor that is
    missing, unexpected or of another shape (with both shapes), never load_state_dict's multi-line RuntimeError."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        name, where = (missing[0], "missing from") if missing else (unexpected[0], "unknown to")
        raise BundleError(f"{path}: weights do not fit the bundle's config: tensor {name[:200]!r} is {where} the "
                          f"config's network ({len(missing)} missing, {len(unexpected)} unknown)")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise BundleError(f"{path}: weights do not fit the bundle's config: tensor {name!r} has shape "
                              f"{tuple(state[name].shape)} in the file, {tuple(tensor.shape)} in the config's network")
    module.load_state_dict(state)


def load_networks(bundle: Bundle, lpips_weights: str | None = None) -> PhanesNetworks:
    """A bundle's networks in eval mode, from its verified weights; a BundleError when they do not fit its config."""
    nets = PhanesNetworks(bundle.config, lpips_weights=lpips_weights)
    parts = (("ra", nets.ra, bundle.ra_state), ("generator", nets.generator, bundle.generator_state))
    for name, module, state in parts:
        fit_weights(module, state, bundle.path / WEIGHT_FILES[name])
    return nets.eval()


def bf16_autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (tensor cores, fp32 range), plain fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class TorchBackend:
    """Eager PyTorch on CPU or CUDA; on CUDA the convolutions run under bf16 autocast unless disabled.

    Frozen (the default, for inference): eval mode, gradients off, `inference_mode`, and on the CPU
    channels-last weights (oneDNN's NHWC convolutions, measured ~1.3x faster; sums in another order, so
    results differ from the plain layout in the last bits). Trainable (for the trainer's validation and
    stage 2 masks): the networks keep their mode, layout and `requires_grad`, and calls run under
    `no_grad`, because inference-mode tensors cannot enter a later backward pass.
    """

    name = "torch"

    def __init__(self, networks: PhanesNetworks, device: torch.device, autocast: bool = True,
                 trainable: bool = False) -> None:
        self.device = device
        self.networks = networks.to(device)
        if not trainable:
            self.networks.eval()
            for p in self.networks.parameters():
                p.requires_grad_(False)
            if device.type == "cpu":
                self.networks = self.networks.to(memory_format=torch.channels_last)
        self._autocast = autocast
        self._no_grad = torch.no_grad if trainable else torch.inference_mode

    def reconstruct(self, x: Tensor) -> Tensor:
        with self._no_grad(), bf16_autocast(self.device, self._autocast):
            return self.networks.ra.reconstruct(x).float()

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        with self._no_grad(), bf16_autocast(self.device, self._autocast):
            return self.networks.generator(masked, mask).float()

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        with self._no_grad():
            return self.networks.lpips(a, b).float()
