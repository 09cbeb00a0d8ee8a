"""phanes: screen brain MRI cohorts for anomalies with PHANES pseudo-healthy generative networks.

The Python API is the functions the commands call (README "Python API"):

    from phanes_cli import ScreenOptions, load_bundle, screen
    from phanes_cli import predict  # one volume in memory: nibabel images + its statistics row

Names resolve on first use, so `import phanes_cli` (and `phanes --help`) stays free of torch and Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (defining module, its name there). `calibrate_bundle`: the module phanes_cli.calibrate.run
# would shadow a package attribute named `calibrate` once imported.
_EXPORTS = {
    "screen": ("phanes_cli.screening.engine", "screen"),
    "ScreenOptions": ("phanes_cli.screening.options", "ScreenOptions"),
    "ScreenSummary": ("phanes_cli.screening.engine", "ScreenSummary"),
    "load_bundle": ("phanes_cli.core.bundle", "load_bundle"),
    "train": ("phanes_cli.training.trainer", "train"),
    "calibrate_bundle": ("phanes_cli.calibrate.run", "calibrate"),
    "evaluate": ("phanes_cli.evaluation.evaluate", "evaluate"),
    "prepare_manifest": ("phanes_cli.inputs.discovery", "prepare_manifest"),
    "read_manifest": ("phanes_cli.inputs.manifest", "read_manifest"),
    "load_config": ("phanes_cli.config", "load_config"),
    "load_with_brain": ("phanes_cli.inputs.brain_masks", "load_with_brain"),
    "brain_mask_for": ("phanes_cli.inputs.brain_masks", "brain_mask_for"),
    "run_volume": ("phanes_cli.core.pipeline", "run_volume"),
    "check_volume": ("phanes_cli.inputs.quality", "check_volume"),
    "predict": ("phanes_cli.screening.predict", "predict"),
    "Prediction": ("phanes_cli.screening.predict", "Prediction"),
}
__all__ = [  # spelled out for linters and IDEs; the same names as _EXPORTS (a test checks)
    "Prediction", "ScreenOptions", "ScreenSummary", "__version__", "brain_mask_for", "calibrate_bundle", "check_volume",
    "evaluate", "load_bundle", "load_config", "load_with_brain", "predict", "prepare_manifest", "read_manifest",
    "run_volume", "screen", "train",
]

if TYPE_CHECKING:
    from phanes_cli.calibrate.run import calibrate as calibrate_bundle
    from phanes_cli.config import load_config
    from phanes_cli.core.bundle import load_bundle
    from phanes_cli.core.pipeline import run_volume
    from phanes_cli.evaluation.evaluate import evaluate
    from phanes_cli.inputs.brain_masks import brain_mask_for, load_with_brain
    from phanes_cli.inputs.discovery import prepare_manifest
    from phanes_cli.inputs.manifest import read_manifest
    from phanes_cli.inputs.quality import check_volume
    from phanes_cli.screening.engine import ScreenSummary, screen
    from phanes_cli.screening.options import ScreenOptions
    from phanes_cli.screening.predict import Prediction, predict
    from phanes_cli.training.trainer import train


def __getattr__(name: str) -> Any:
    """Import the defining module of a public name on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phanes_cli' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
