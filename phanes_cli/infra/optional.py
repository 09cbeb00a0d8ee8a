"""Optional dependencies (pyproject extras): import them where a feature needs them, with a one-line error naming
the extra that installs them, so a base `pip install phanes` fails only at the feature, never with a traceback."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from phanes_cli.errors import MissingExtraError

# module -> (pyproject extra that installs it, PyPI name)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "bids2table": ("bids", "bids2table"),
    "PIL": ("report", "pillow"),
    "triton": ("gpu", "triton"),
}


def missing_message(module: str, feature: str) -> str:
    extra, package = EXTRAS[module]
    return f"{feature} needs the optional package {package}: pip install 'phanes[{extra}]'"


def available(module: str) -> bool:
    """Whether `module` is importable, without importing it."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError: '<feature> needs the optional package X: pip install ...'."""
    if not available(module):
        raise MissingExtraError(missing_message(module, feature))
    return importlib.import_module(module)
