"""Versions of the packages that decide the numbers phanes produces, recorded in bundles and run manifests."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"  # the same as pyproject.toml's `version`

PACKAGES = ("torch", "ray", "numpy", "nibabel", "pyarrow", "onnxruntime")


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def runtime_versions() -> dict[str, str | None]:
    """phanes, Python and every package in PACKAGES (None for one that is missing)."""
    return {"phanes": __version__, "python": platform.python_version(), **{n: package_version(n) for n in PACKAGES}}
