"""Slices for parity checks and benchmarks: real brain anatomy and random images, both reproducible offline.

The real slices come from the MNI152 2009a T1 template shipped with phanes (no download), prepared exactly
as screening prepares a volume, so parity and speed are measured on what the pipeline really sees.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import load_volume
from phanes_cli.infra.packaged_data import mni152_path


def brain_slices(cfg: PreprocessConfig, n: int) -> tuple[Tensor, Tensor]:
    """n real axial brain slices (2 mm) and their brain masks, (n, 1, S, S) each; slices repeat when n is larger."""
    data = load_volume(mni152_path("t1_1mm")).data[::2, ::2, ::2]
    prepared = prepare_volume(data, data > 0.1 * float(data.max()), cfg)
    repeat = -(-n // prepared.slices.shape[0])
    return prepared.slices.repeat(repeat, 1, 1, 1)[:n].clone(), prepared.brain.repeat(repeat, 1, 1, 1)[:n].clone()


def random_slices(cfg: PreprocessConfig, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n smooth random images in [0, 1] inside a disc 'brain', (n, 1, S, S) each."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    images = ndimage.gaussian_filter(rng.random((n, s, s)), sigma=(0, 2, 2))
    images = (images - images.min()) / (np.ptp(images) + 1e-8)
    yy, xx = np.mgrid[:s, :s]
    disc = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (0.42 * s) ** 2).astype(np.float32)
    x = torch.from_numpy((images * disc).astype(np.float32))[:, None]
    return x, torch.from_numpy(np.broadcast_to(disc, (n, s, s)).copy())[:, None]
