"""The methods `phanes evaluate` compares, all taken from `pipeline.infer_slices`, the road screening takes.

- `phanes`: the full pipeline; score s(x) (paper Eq. 4), prediction s(x) >= the calibrated anomaly threshold.
- `ra`: stage 1 alone, the paper's RA row; score m(x) (Eq. 3), prediction m(x) > the calibrated mask
  threshold *before* dilation. Dilation only gives the inpainter context around a lesion; it is a PHANES
  step, not part of RA's own segmentation, and would bias RA's Dice and lesion volume upwards.
- `phanes-gt`: stage 2 inpaints the ground-truth mask instead of the stage 1 mask (the upper bound), via
  `run_slices(given_mask=...)`; scored like `phanes`.
- `residual`: the plain baseline |x - x_cph| inside the brain. It has no calibrated threshold, so only
  threshold-free metrics (AUPRC, [Dice]) are reported for it.

`phanes`, `ra` and `residual` share one pass (RA's map and the reconstruction are kept from it);
`phanes-gt` is a second pass with the given mask (its stage 1 work is repeated: the price of one road).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import ModelMaps, VolumeMaps, infer_slices
from phanes_cli.errors import ConfigError

METHODS: dict[str, str] = {
    "phanes": "PHANES: s(x) of the pseudo-healthy image",
    "ra": "RA: the stage 1 map m(x)",
    "phanes-gt": "PHANES-GT: stage 2 inpaints the ground-truth mask (upper bound)",
    "residual": "Residual: |x - x_cph| of the stage 1 reconstruction",
}
DEFAULT_METHODS: tuple[str, ...] = ("phanes", "ra", "phanes-gt")
UNCALIBRATED: frozenset[str] = frozenset({"residual"})


def validate_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Known method names in the given order, duplicates dropped; an unknown or empty list is a ConfigError."""
    names = tuple(dict.fromkeys(m.strip().lower() for m in methods if m.strip()))
    if not names:
        raise ConfigError(f"no evaluation method given; choose from {', '.join(METHODS)}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown evaluation method(s) {', '.join(unknown)}; valid methods: {', '.join(METHODS)}")
    return names


def threshold(method: str, calibration: Calibration) -> float:
    """The calibrated level a method's prediction uses; inf for methods without one."""
    if method in ("phanes", "phanes-gt"):
        return float(calibration.anomaly_threshold)
    if method == "ra":
        return float(calibration.mask_threshold)
    return math.inf


def predict(method: str, score: np.ndarray, brain: np.ndarray, calibration: Calibration,
            voxel_ml: float | None = None) -> np.ndarray | None:
    """Binary prediction of a method from its score map (any shape); None for uncalibrated methods.

    PHANES applies the lesion rule (`core.lesion_rule`): on a volume (`voxel_ml` given) with the calibration's
    minimum lesion size, as screening does; on slices its threshold alone. RA the strict `>` of the stage 1
    binarisation.
    """
    if method in ("phanes", "phanes-gt"):
        rule = LesionRule.from_calibration(calibration)
        return rule.candidates(score, brain) if voxel_ml is None else rule.apply(score, brain, voxel_ml)
    if method == "ra":
        return (score > calibration.mask_threshold) & np.asarray(brain, dtype=bool)
    return None


@dataclass(frozen=True)
class MethodMaps:
    """Model-grid maps of the requested methods over a set of slices."""

    phanes: ModelMaps | None  # the PHANES pass; RA's m(x) and the reconstruction come from it too
    phanes_gt: ModelMaps | None  # the pass that inpaints the ground truth
    residual: np.ndarray | None  # |x - x_cph| inside the brain, (N, 1, S, S)


def run_methods(
    x: Tensor,
    brain: Tensor,
    truth: Tensor | None,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    methods: Sequence[str],
    batch_size: int,
    pseudo_healthy: bool = False,
) -> MethodMaps:
    """Run every requested method over (N, 1, S, S) slices; `truth` (same shape) only for `phanes-gt`.

    `pseudo_healthy` also keeps each method's pseudo-healthy image (x_ph, or x_cph for the stage 1 methods).
    """
    keep = {"inpaint_mask"}
    if "ra" in methods:
        keep.add("stage1_map")
    if "residual" in methods or pseudo_healthy:
        keep.add("x_cph")
    if pseudo_healthy:
        keep.add("x_ph")
    main = gt = residual = None
    if set(methods) - {"phanes-gt"}:
        main = infer_slices(x, brain, backend, cfg, calibration.mask_threshold, batch_size, keep)
    if "phanes-gt" in methods:
        if truth is None:
            raise ValueError("phanes-gt needs the ground-truth mask")
        gt = infer_slices(x, brain, backend, cfg, calibration.mask_threshold, batch_size,
                          keep & {"inpaint_mask", "x_ph"}, given_mask=truth)
    if main is not None and main.x_cph is not None and "residual" in methods:
        residual = (np.abs(x.numpy() - main.x_cph) * brain.numpy()).astype(np.float32)
    return MethodMaps(phanes=main, phanes_gt=gt, residual=residual)


def scores_of(methods: Sequence[str], main: ModelMaps | VolumeMaps | None, gt: ModelMaps | VolumeMaps | None,
              residual: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each method's score map, on either grid: s(x) and m(x) of the PHANES pass, s(x) of the PHANES-GT pass."""
    found = {"phanes": None if main is None else main.anomaly, "ra": None if main is None else main.stage1_map,
             "phanes-gt": None if gt is None else gt.anomaly, "residual": residual}
    out = {m: found[m] for m in methods}
    missing = [m for m, v in out.items() if v is None]
    if missing:
        raise ValueError(f"no map was computed for method(s) {', '.join(missing)}")
    return {m: v for m, v in out.items() if v is not None}


def model_pseudo_healthy(maps: MethodMaps, method: str) -> np.ndarray:
    """A method's pseudo-healthy image on the model grid (run with `pseudo_healthy=True`)."""
    source = maps.phanes_gt if method == "phanes-gt" else maps.phanes
    image = None if source is None else (source.x_ph if method in ("phanes", "phanes-gt") else source.x_cph)
    if image is None:
        raise ValueError(f"no pseudo-healthy image was kept for method {method}")
    return image
