"""The options of one calibration (`phanes calibrate` flags) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from phanes_cli.core.shipped_models import default_bundle
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.brain_masks import check_mode
from phanes_cli.runtimes import validate_backend_name


@dataclass(frozen=True)
class CalibrateOptions:
    """Everything `phanes calibrate` takes: which bundle, which healthy volumes, which overrides, where it goes.

    None in an override keeps the bundle config's value (`mask.*`, `tune.*`); overrides are stored in the bundle
    with the calibration they produced.
    """

    manifest: Path
    bundle: Path | None = None  # None: the model shipped with phanes (which only takes a calibration into `out`)
    out: Path | None = None  # a new or empty folder: calibrate a copy there and leave `bundle` as it is
    split: str = "val"  # the manifest split of healthy volumes; never 'test'
    device: str = "auto"
    skull_strip: str = "auto"  # auto | always | never (inputs/brain_masks.py)
    batch_size: int = 32
    mask_percentile: float | None = None  # healthy percentile of m(x), in (0, 100)
    anomaly_percentile: float | None = None  # healthy percentile of s(x), in (0, 100)
    tune: bool | None = None  # pick the operating point by Dice on inserted lesions (None: the config's tune.enabled)
    slice_context: bool | None = None
    healthy_fp_budget_ml: float | None = None  # with tuning: median false-positive mL per healthy volume
    healthy_fp_budget_components: float | None = None  # with tuning: median false-positive components
    backend: str = "auto"
    lpips_weights: str | None = None
    progress: bool = True

    def source(self) -> Path:
        """The bundle calibrated: `bundle`, or the shipped model."""
        return Path(self.bundle) if self.bundle is not None else default_bundle()

    def validate(self) -> None:
        """A one-line error naming the first bad option, before any bundle or volume is read."""
        if self.split == "test":
            raise ConfigError("calibration never uses the 'test' split: thresholds chosen on test data would "
                              "inflate every test figure")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_mode(self.skull_strip)
        validate_backend_name(self.backend)
        for flag, value in (("--mask-percentile", self.mask_percentile),
                            ("--anomaly-percentile", self.anomaly_percentile)):
            if value is not None and not 0 < value < 100:
                raise ConfigError(f"{flag} must lie strictly between 0 and 100, got {value}")
        for flag, value, unit in (("--healthy-fp-budget-ml", self.healthy_fp_budget_ml, "mL"),
                                  ("--healthy-fp-budget-components", self.healthy_fp_budget_components,
                                   "components")):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag}: healthy false-positive budget must be a finite number of {unit} >= 0, "
                                  f"got {value}")
