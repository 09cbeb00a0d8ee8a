"""Slices for parity checks, quantisation and benchmarks: real brain anatomy and random images, all offline.

The real slices come from the T1s shipped with phanes (no download): the MNI152 2009a template, and the real
healthy brains of `data/healthy_t1`, prepared exactly as screening prepares a volume, so parity, gates and
speed are measured on what the pipeline really sees. The shipped brains are split in two disjoint sets: INT8
calibration never sees a brain that the export gate then judges it on.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import auto_brain_mask, prepare_volume
from phanes_cli.core.volume_io import load_volume
from phanes_cli.infra.packaged_data import DATA_DIR, mni152_path

# Shipped skull-stripped healthy T1s (data/healthy_t1, licences in data/NOTICE): two population templates and
# Colin27 calibrate INT8 activations; three other individuals' brains are what the export gate judges masks on.
CALIBRATION_BRAINS = ("antspy_mni152_T1", "niivue_icbm2009_T1", "antspy_colin27_ch2_T1")
GATE_BRAINS = ("niimath_adult_T1", "niivue_fs_norm_T1", "studyforrest_T1w_brain")


def brain_slices(cfg: PreprocessConfig, n: int) -> tuple[Tensor, Tensor]:
    """n real axial brain slices (2 mm) and their brain masks, (n, 1, S, S) each; slices repeat when n is larger."""
    data = load_volume(mni152_path("t1_1mm")).data[::2, ::2, ::2]
    prepared = prepare_volume(data, data > 0.1 * float(data.max()), cfg, (2.0, 2.0, 2.0))
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


def shipped_brain_slices(cfg: PreprocessConfig, names: tuple[str, ...], per_brain: int) -> tuple[Tensor, Tensor]:
    """`per_brain` evenly spaced axial slices of each named shipped brain (its processed range, ends left out) and
    their brain masks, (len(names) * per_brain, 1, S, S) each."""
    x, brain = _shipped_brain_slices(cfg, names, per_brain)
    return x.clone(), brain.clone()


@functools.lru_cache(maxsize=4)  # decoding three 1 mm brains takes seconds; a process exporting again reuses them
def _shipped_brain_slices(cfg: PreprocessConfig, names: tuple[str, ...], per_brain: int) -> tuple[Tensor, Tensor]:
    images, brains = [], []
    for name in names:
        volume = load_volume(DATA_DIR / "healthy_t1" / f"{name}.nii.gz")
        prepared = prepare_volume(volume.data, auto_brain_mask(volume.data), cfg, volume.zooms)
        n = prepared.slices.shape[0]
        index = torch.from_numpy(np.linspace(0, n - 1, per_brain + 2)[1:-1].round().astype(np.int64))
        images.append(prepared.slices[index])
        brains.append(prepared.brain[index])
    return torch.cat(images), torch.cat(brains)
