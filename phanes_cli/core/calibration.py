"""The calibration of a model: the one description of its operating point, stored in every bundle and run.

`mask_threshold` binarises the stage 1 map m(x) into the inpainting mask (applied on the model grid, where
m(x) lives); `anomaly_threshold` and `min_lesion_ml` make the lesion rule (`core.lesion_rule`) that turns
the anomaly map s(x) into the lesion mask on the volume grid. `phanes calibrate` computes them (healthy
percentiles, or tuned on validation lesions); bundles store `to_dict()` as calibration.json and screening
runs record it in run.json; `from_dict` is the one reader and validator of both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from phanes_cli.errors import BundleError, ConfigError

_KEYS = frozenset({"mask_threshold", "anomaly_threshold", "n_slices", "n_volumes", "min_lesion_ml", "tuning"})
_RETIRED = frozenset({"domain"})  # written by earlier versions, read and ignored
THRESHOLD_COLUMNS = ("mask_threshold", "anomaly_threshold", "min_lesion_ml")  # `columns()`: in every table row


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Calibration:
    """A model's thresholds and minimum lesion size, with what they were learnt from."""

    mask_threshold: float  # binarises the stage 1 map m(x) into the inpainting mask (model grid)
    anomaly_threshold: float  # the lesion rule's threshold on s(x) (volume grid)
    n_slices: int = 0  # healthy validation slices behind the mask threshold
    n_volumes: int = 0  # validation volumes behind the anomaly threshold
    min_lesion_ml: float = 0.0  # the lesion rule drops components smaller than this
    tuning: dict[str, Any] | None = None  # `calibrate --tune`: the choice and its validation figures

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included: what a reader gets back needs no filling in."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: object) -> Calibration:
        """A Calibration from stored values (calibration.json, run.json); a BundleError names `source` and the key
        of a missing, unknown, non-finite or out-of-range value."""
        if not isinstance(values, dict):
            raise BundleError(f"{source}: calibration must be a JSON object, got {type(values).__name__}")
        values = {k: v for k, v in values.items() if k not in _RETIRED}
        unknown = sorted(set(values) - _KEYS)
        if unknown:
            raise BundleError(f"{source}: unknown calibration key(s) {', '.join(unknown)}")
        for key in ("mask_threshold", "anomaly_threshold"):
            if not _positive_number(values.get(key)):
                raise BundleError(f"{source}: calibration {key} must be a finite number above 0, got "
                                  f"{values.get(key)!r}")
        for key in ("n_slices", "n_volumes"):
            value = values.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BundleError(f"{source}: calibration {key} must be a whole number >= 0, got {value!r}")
        minimum = values.get("min_lesion_ml", 0.0)
        if isinstance(minimum, bool) or not (minimum == 0 or _positive_number(minimum)):
            raise BundleError(f"{source}: calibration min_lesion_ml must be a finite number >= 0, got {minimum!r}")
        if not isinstance(values.get("tuning", {}), (dict, type(None))):
            raise BundleError(f"{source}: calibration tuning must be a JSON object, got {values['tuning']!r}")
        return cls(**values)

    def with_lesion_rule(self, anomaly_threshold: float | None = None, min_lesion_ml: float | None = None
                         ) -> Calibration:
        """This calibration with another anomaly threshold and/or minimum lesion size (`screen --min-lesion-ml`,
        `phanes stats --threshold`); None keeps the calibrated value."""
        for name, value in (("threshold", anomaly_threshold), ("minimum lesion size", min_lesion_ml)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        return replace(self, anomaly_threshold=self.anomaly_threshold if anomaly_threshold is None
                       else float(anomaly_threshold),
                       min_lesion_ml=self.min_lesion_ml if min_lesion_ml is None else float(min_lesion_ml))

    def columns(self) -> dict[str, float]:
        """The thresholds and minimum lesion size a lesion mask was made with, as table columns."""
        return {name: getattr(self, name) for name in THRESHOLD_COLUMNS}
