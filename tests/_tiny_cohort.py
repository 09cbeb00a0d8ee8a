"""Tiny healthy cohorts and a tiny model config for fast training/calibration tests (shared helper).

Subjects are the MNI152 template (nilearn's, shipped with phanes) downsampled to 4 mm, each
with its own smooth intensity field and a one-voxel shift, so they differ like real subjects do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from phanes_cli.config import AOTConfig, PhanesConfig, PreprocessConfig, RAConfig, StageTrainConfig, TrainConfig
from phanes_cli.infra.packaged_data import mni152_image
from phanes_cli.inputs.manifest import ManifestRow, write_manifest

_TEMPLATE: np.ndarray | None = None


def _template() -> tuple[np.ndarray, np.ndarray]:
    global _TEMPLATE
    img = mni152_image("t1_2mm")
    if _TEMPLATE is None:
        _TEMPLATE = ndimage.zoom(np.asarray(img.get_fdata(), dtype=np.float32), 0.5, order=1)
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    return _TEMPLATE, affine


def write_cohort(folder: Path, n_train: int = 3, n_val: int = 2, seed: int = 0) -> Path:
    """NIfTI images + brain masks + manifest.parquet; returns the manifest path."""
    base, affine = _template()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_val):
        field = ndimage.gaussian_filter(rng.normal(0, 1, base.shape), 6)
        field = 1.0 + 0.15 * field / (np.abs(field).max() + 1e-6)
        data = np.roll(base * field, shift=tuple(rng.integers(-1, 2, size=3)), axis=(0, 1, 2)).astype(np.float32)
        brain = data > 0.1 * data.max()
        image_path, brain_path = folder / f"sub{i}.nii.gz", folder / f"sub{i}_brain.nii.gz"
        nib.save(nib.Nifti1Image(data * brain, affine), str(image_path))
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(brain_path))
        rows.append(ManifestRow(id=f"sub{i}", image=image_path, brain_mask=brain_path,
                                split="train" if i < n_train else "val", kind="healthy"))
    return write_manifest(rows, folder / "manifest.parquet")


def tiny_config(steps: int = 3, **train: object) -> PhanesConfig:
    """A model small enough to train a few steps in seconds on 2 CPU cores (32 px slices)."""
    stage = StageTrainConfig(max_epochs=1000, max_steps=steps, lr=1e-3, patience=50, val_every=1)
    train_cfg = dataclasses.replace(TrainConfig(seed=0, batch_size=4, checkpoint_every=1, stage1=stage, stage2=stage,
                                                random_masks_per_image=4), **train)
    return PhanesConfig(
        name="tiny",
        ra=RAConfig(channels=(4, 8, 8, 16, 16), latent_dim=8),
        aot=AOTConfig(base_channels=4, channels=8, blocks=1, rates=(1, 2), disc_channels=(4, 8, 8, 16)),
        preprocess=PreprocessConfig(image_size=32, min_brain_fraction=0.3),
        train=train_cfg,
    )


def untrained_bundle(folder: Path, seed: int) -> Path:
    """A bundle of `tiny_config` with seeded untrained networks, uncalibrated: what export and backend tests judge."""
    import torch

    from phanes_cli.core.bundle import save_bundle
    from phanes_cli.runtimes.pytorch import PhanesNetworks

    torch.manual_seed(seed)
    nets = PhanesNetworks(tiny_config())
    save_bundle(folder, tiny_config(), nets.ra, nets.generator)
    return folder
