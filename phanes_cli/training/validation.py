"""Validation on the healthy val split, and the stage 1 threshold that cuts stage 2's training holes.

Stage 1 is scored by the reconstruction MSE of x_cph, stage 2 by the L1 error of the composite inside
fixed random holes. Both run on at most VAL_MAX_SLICES evenly spread slices: cheap, fixed and
representative. The networks run in eval mode through the learner's trainable backend.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from phanes_cli.config import PhanesConfig
from phanes_cli.core.percentiles import stage1_percentile
from phanes_cli.errors import PhanesError
from phanes_cli.training.data import SliceSet, hash_seed, spread_subset
from phanes_cli.training.holes import random_training_masks
from phanes_cli.training.steps import Learner, evaluating

VAL_MAX_SLICES = 256
EVAL_BATCH = 32
STAGE1_THRESHOLD_SLICES = 512  # enough brain pixels (~10^6) for a stable 99th percentile, at a fixed cost


def validation_view(data: SliceSet) -> SliceSet:
    """The fixed validation slices of a run."""
    return data.subset(spread_subset(len(data), VAL_MAX_SLICES))


def validation_holes(config: PhanesConfig, view: SliceSet) -> Tensor:
    """Seeded random holes inside the brain of the validation slices, the same in every session."""
    generator = torch.Generator().manual_seed(hash_seed(config.train.seed, 2, len(view)))
    return random_training_masks(len(view), config.preprocess.image_size, config.train.random_masks_per_image,
                                 generator) * view.brain


@torch.no_grad()
def stage1_validation(learner: Learner, data: SliceSet) -> float:
    """Mean squared error per pixel of the deterministic reconstruction x_cph."""
    total, count = 0.0, 0
    with evaluating(learner.networks.ra):
        for start in range(0, len(data), EVAL_BATCH):
            x = data.images[start : start + EVAL_BATCH].to(learner.device)
            total += float((learner.backend.reconstruct(x) - x).pow(2).sum())
            count += x.numel()
    return total / max(count, 1)


@torch.no_grad()
def stage2_validation(learner: Learner, data: SliceSet, holes: Tensor) -> float:
    """Mean absolute error of the composite inside fixed holes (N, 1, S, S)."""
    total, count = 0.0, 0.0
    with evaluating(learner.networks.generator):
        for start in range(0, len(data), EVAL_BATCH):
            x = data.images[start : start + EVAL_BATCH].to(learner.device)
            m = holes[start : start + EVAL_BATCH].to(learner.device)
            comp = x * (1 - m) + learner.backend.inpaint(x * (1 - m) + m, m) * m
            total += float(((comp - x).abs() * m).sum())
            count += float(m.sum())
    return total / max(count, 1.0)


@torch.no_grad()
def stage1_threshold(learner: Learner, data: SliceSet) -> float:
    """The calibration rule (`core.percentiles.stage1_percentile`) on up to STAGE1_THRESHOLD_SLICES evenly spread
    healthy training slices, at `train.hole_percentile` (default: the mask percentile): the level that binarises
    stage 1 maps into stage 2 training holes."""
    view = data.subset(spread_subset(len(data), STAGE1_THRESHOLD_SLICES))
    config = learner.config
    holes = config.mask if config.train.hole_percentile is None else replace(
        config.mask, mask_percentile=config.train.hole_percentile)
    with evaluating(learner.networks.ra):
        threshold = stage1_percentile(learner.backend, view.images, view.brain, holes, EVAL_BATCH)
    if not math.isfinite(threshold):
        raise PhanesError("training: the healthy training slices hold no brain pixels, so stage 1 cannot mask any")
    return threshold
