"""The methods `phanes evaluate` compares, derived from one pass of the networks per batch of slices.

- `phanes`: the full pipeline; score s(x) (paper Eq. 4), prediction s(x) >= the calibrated anomaly threshold.
- `ra`: stage 1 alone, the paper's RA row; score m(x) (Eq. 3), prediction m(x) > the calibrated mask
  threshold *before* dilation. Dilation only gives the inpainter context around a lesion; it is a PHANES
  step, not part of RA's own segmentation, and would bias RA's Dice and lesion volume upwards.
- `phanes-gt`: stage 2 inpaints the ground-truth mask instead of the stage 1 mask (the upper bound);
  scored like `phanes`.
- `residual`: the plain baseline |x - x_cph| inside the brain. It has no calibrated threshold, so only
  threshold-free metrics (AUPRC, [Dice]) are reported for it.

Stage 1 runs once per batch and is shared by every method; `phanes-gt` only reruns stage 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from phanes_cli.backends import Backend
from phanes_cli.config import PhanesConfig
from phanes_cli.errors import ConfigError
from phanes_cli.pipeline import Calibration, anomaly_map, inpaint, lesion_mask, run_slices, stage1_map

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


def predict(method: str, score: np.ndarray, brain: np.ndarray, calibration: Calibration) -> np.ndarray | None:
    """Binary prediction of a method from its score map (any shape); None for uncalibrated methods.

    PHANES uses `pipeline.lesion_mask`; RA the strict `>` of the stage 1 binarisation.
    """
    if method in ("phanes", "phanes-gt"):
        return lesion_mask(score, brain, calibration.anomaly_threshold)
    if method == "ra":
        return (score > calibration.mask_threshold) & np.asarray(brain, dtype=bool)
    return None


@dataclass(frozen=True)
class MethodOutput:
    """One method's maps for a batch on the model grid, all (N, 1, S, S) float32."""

    score: Tensor  # the anomaly map the method is scored on
    pseudo_healthy: Tensor  # x_ph for the PHANES variants, x_cph for stage 1 methods
    inpaint_mask: Tensor | None  # the mask stage 2 inpainted (PHANES variants only)


def method_outputs(
    x: Tensor,
    brain: Tensor,
    truth: Tensor | None,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    methods: Sequence[str],
) -> dict[str, MethodOutput]:
    """Run every requested method on one batch: x, brain, truth (N, 1, S, S); truth only for `phanes-gt`."""
    dev = backend.device
    x = x.to(dev, torch.float32)
    brain = brain.to(dev, torch.float32)
    out: dict[str, MethodOutput] = {}
    if "phanes" in methods:
        maps = run_slices(x, brain, backend, cfg, calibration)
        x_cph, ra_map = maps.x_cph, maps.ra_map
        out["phanes"] = MethodOutput(maps.anomaly, maps.x_ph, maps.mask)
    elif "ra" in methods or "residual" in methods:
        x_cph = backend.reconstruct(x)
        ra_map = stage1_map(x, x_cph, brain, backend, cfg.mask)
    if "ra" in methods:
        out["ra"] = MethodOutput(ra_map, x_cph, None)
    if "residual" in methods:
        out["residual"] = MethodOutput((x - x_cph).abs() * brain, x_cph, None)
    if "phanes-gt" in methods:
        if truth is None:
            raise ValueError("phanes-gt needs the ground-truth mask")
        mask = (truth.to(dev) > 0.5).float() * brain
        x_ph = inpaint(x, mask, backend)
        out["phanes-gt"] = MethodOutput(anomaly_map(x, x_ph, mask, brain, backend), x_ph, mask)
    return {m: out[m] for m in methods}
