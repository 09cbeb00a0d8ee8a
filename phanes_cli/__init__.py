"""phanes: screen brain MRI cohorts for anomalies with PHANES pseudo-healthy generative networks.

The Python API is the functions the commands call (README "Python API", docs/python_api.md):

    from phanes_cli import ScreenOptions, load_bundle, screen
    from phanes_cli import predict  # one volume in memory: nibabel images + its statistics row

Names resolve on first use, so `import phanes_cli` (and `phanes --help`) stays free of torch and Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from phanes_cli.infra.versions import __version__

# public name -> (defining module, its name there): the API, and `__all__`. Type checkers read the same names
# from the TYPE_CHECKING imports below (tests/test_api.py checks that the two agree). `calibrate_bundle`: the
# module phanes_cli.calibrate.run would shadow a package attribute named `calibrate` once imported.
_EXPORTS = {
    "screen": ("phanes_cli.screening.engine", "screen"),
    "ScreenOptions": ("phanes_cli.screening.options", "ScreenOptions"),
    "ScreenSummary": ("phanes_cli.screening.engine", "ScreenSummary"),
    "load_bundle": ("phanes_cli.core.bundle", "load_bundle"),
    "train": ("phanes_cli.training.trainer", "train"),
    "TrainOptions": ("phanes_cli.training.options", "TrainOptions"),
    "calibrate_bundle": ("phanes_cli.calibrate.run", "calibrate"),
    "CalibrateOptions": ("phanes_cli.calibrate.options", "CalibrateOptions"),
    "evaluate": ("phanes_cli.evaluation.evaluate", "evaluate"),
    "EvaluateOptions": ("phanes_cli.evaluation.options", "EvaluateOptions"),
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
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # explicit re-exports (`name as name`)
    from phanes_cli.calibrate.options import CalibrateOptions as CalibrateOptions
    from phanes_cli.calibrate.run import calibrate as calibrate_bundle  # noqa: F401 (in __all__ through _EXPORTS)
    from phanes_cli.config import load_config as load_config
    from phanes_cli.core.bundle import load_bundle as load_bundle
    from phanes_cli.core.pipeline import run_volume as run_volume
    from phanes_cli.evaluation.evaluate import evaluate as evaluate
    from phanes_cli.evaluation.options import EvaluateOptions as EvaluateOptions
    from phanes_cli.inputs.brain_masks import brain_mask_for as brain_mask_for
    from phanes_cli.inputs.brain_masks import load_with_brain as load_with_brain
    from phanes_cli.inputs.discovery import prepare_manifest as prepare_manifest
    from phanes_cli.inputs.manifest import read_manifest as read_manifest
    from phanes_cli.inputs.quality import check_volume as check_volume
    from phanes_cli.screening.engine import ScreenSummary as ScreenSummary
    from phanes_cli.screening.engine import screen as screen
    from phanes_cli.screening.options import ScreenOptions as ScreenOptions
    from phanes_cli.screening.predict import Prediction as Prediction
    from phanes_cli.screening.predict import predict as predict
    from phanes_cli.training.options import TrainOptions as TrainOptions
    from phanes_cli.training.trainer import train as train


def __getattr__(name: str) -> Any:
    """Import the defining module of a public name on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phanes_cli' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
