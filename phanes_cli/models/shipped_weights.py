"""The network weights shipped inside the package (phanes_cli/data/weights), each checked by its sha256 on load.

Built by tools/build_shipped_weights.py; licences in phanes_cli/data/NOTICE. A shipped file whose hash differs
from the one recorded here (a damaged or tampered install) is an error, never silently used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from phanes_cli.errors import WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "data" / "weights"
# backbone or head name -> (file under WEIGHTS_DIR, its sha256)
SHIPPED: dict[str, tuple[str, str]] = {
    "alexnet": ("alexnet_features.safetensors", "9f97fd313f4da83dbe6bbfbe6effca1241de9edfcd7c53386261ed9697286dd9"),
    "vgg16": ("vgg16_features_fp16.safetensors", "a0606ae48e5838fd6444b0c3105007fa554a81714ed9c937f2e1ca122c57b345"),
    "lpips_heads": ("lpips_alex_v0.1_heads.safetensors",
                    "255d6454292d155a069f693a111769acec003d588617b250f24775369c816e04"),
}


def shipped_path(name: str) -> Path | None:
    """The shipped file of `name`, or None when the install has none."""
    path = WEIGHTS_DIR / SHIPPED[name][0]
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_shipped(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (float32); a shipped file must also match its recorded sha256."""
    for file_name, digest in SHIPPED.values():
        if path.resolve() == (WEIGHTS_DIR / file_name).resolve() and _sha256(path) != digest:
            raise WeightsError(f"{path}: shipped weight file changed (sha256 mismatch); reinstall phanes "
                               "(pip install --force-reinstall phanes)")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for foreign formats
        raise WeightsError(f"{path}: not a valid safetensors weight file ({type(exc).__name__}: {exc})") from exc
    return {key: value.float() for key, value in state.items()}


def lpips_heads() -> dict[str, torch.Tensor]:
    """The LPIPS v0.1 AlexNet linear heads: lin{i}.model.1.weight, (1, C_i, 1, 1) each."""
    path = shipped_path("lpips_heads")
    if path is None:
        raise WeightsError(f"{WEIGHTS_DIR / SHIPPED['lpips_heads'][0]}: LPIPS linear-head weights missing; "
                           "reinstall phanes (pip install --force-reinstall phanes)")
    return read_shipped(path)
