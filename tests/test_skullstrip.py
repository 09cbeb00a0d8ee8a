"""Skull stripping: where each brain mask comes from, and that the pretrained model finds the brain in a head.

Oracles: a synthetic head built here from the real MNI152 brain (nilearn, offline) with CSF, a grey skull
and bright scalp at distances computed with scipy, so the true brain is known voxel for voxel (Dice with
plain numpy); and a real head with its skull (../shared/data/head-t1), whose brain must measure an adult
1000-1800 mL while the threshold mask, which takes the whole head, measures far more.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS, load_volume, save_nifti
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.brain_masks import add_model_masks, brain_mask_for, load_with_brain
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.screening.tasks import decode_volume
from phanes_cli.synth.templates import Template, load_mni152
from tests.conftest import SHARED_DATA

HEAD_T1 = SHARED_DATA / "head-t1" / "niivue_otsu_head_T1.nii.gz"


@pytest.fixture(scope="module")
def mni() -> Template:
    return load_mni152()


@pytest.fixture(scope="module")
def files(mni: Template, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stripped MNI152 brain, and the same brain inside 2 mm CSF, 6 mm grey skull and 6 mm bright scalp."""
    folder = tmp_path_factory.mktemp("heads")
    gap = ndimage.distance_transform_edt(mni.brain < 0.5)  # 1 mm voxels: mm from the brain
    head = mni.image.copy()
    head[(gap > 0) & (gap <= 2)] = 0.1
    head[(gap > 2) & (gap <= 8)] = 0.3
    head[(gap > 8) & (gap <= 14)] = 1.2  # scalp fat is brighter than white matter (1.0) on T1
    return {"brain": save_nifti(mni.image.astype(np.float32), mni.affine, folder / "brain.nii.gz"),
            "head": save_nifti(head.astype(np.float32), mni.affine, folder / "head.nii.gz")}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_a_stripped_brain_keeps_the_threshold_mask_under_auto(files: dict[str, Path], mni: Template) -> None:
    volume = load_volume(files["brain"])
    brain, source = brain_mask_for(volume, None, "auto")
    assert source == "threshold"
    assert _dice(brain, mni.brain > 0.5) > 0.97


@pytest.fixture(scope="module")
def head_auto(files: dict[str, Path]) -> tuple[np.ndarray, str]:
    return brain_mask_for(load_volume(files["head"]), None, "auto")


def test_a_head_is_stripped_by_the_model_under_auto(files: dict[str, Path], mni: Template,
                                                    head_auto: tuple[np.ndarray, str]) -> None:
    truth = mni.brain > 0.5
    threshold, source = brain_mask_for(load_volume(files["head"]), None, "never")
    assert source == "threshold"
    assert np.count_nonzero(threshold) > 1.5 * np.count_nonzero(truth)  # the threshold mask takes the head
    brain, source = head_auto
    assert source == "model"
    assert _dice(brain, truth) > 0.95


def test_screening_decode_uses_the_model_mask(files: dict[str, Path], head_auto: tuple[np.ndarray, str]) -> None:
    """The Ray decode task (called directly: same function) strips the head and says so for the volumes table."""
    cfg = PreprocessConfig(image_size=64)
    threads = torch.get_num_threads()  # the decode task sets its own
    try:
        decoded, slices, context = decode_volume(ManifestRow(id="head", image=files["head"]), cfg,
                                                 DEFAULT_MAX_VOXELS, "auto")
    finally:
        torch.set_num_threads(threads)
    assert decoded.failure is None and slices is not None and context is not None
    assert context.brain_source == "model"
    assert _dice(context.brain, head_auto[0]) > 0.99  # one thread here, two there: the same mask up to rounding
    head = load_volume(files["head"])
    expected = prepare_volume(head.data, context.brain, cfg, head.zooms)
    np.testing.assert_array_equal(slices.brain, expected.brain.numpy())


def test_always_runs_the_model_on_a_stripped_brain_too(files: dict[str, Path], mni: Template) -> None:
    brain, source = brain_mask_for(load_volume(files["brain"]), None, "always")
    assert source == "model"
    assert _dice(brain, mni.brain > 0.5) > 0.95


def test_a_mask_file_wins_over_every_mode(files: dict[str, Path], mni: Template, tmp_path: Path) -> None:
    given = (mni.brain > 0.5).astype(np.uint8)
    given[:, :, : given.shape[2] // 2] = 0  # a deliberately different mask: it must be used as given
    mask_file = save_nifti(given, mni.affine, tmp_path / "brain_mask.nii.gz")
    for mode in ("auto", "always", "never"):
        _, brain, source = load_with_brain(files["head"], mask_file, skull_strip=mode)
        assert source == "file"
        np.testing.assert_array_equal(brain, given > 0)


def test_an_unknown_mode_is_a_config_error(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--skull-strip 'sometimes' is not one of auto, always, never"):
        brain_mask_for(load_volume(files["brain"]), None, "sometimes")


def test_prepare_writes_model_masks_only_where_the_model_ran(files: dict[str, Path], mni: Template,
                                                             tmp_path: Path) -> None:
    rows = [ManifestRow(id="brain", image=files["brain"]), ManifestRow(id="head", image=files["head"])]
    out, counts = add_model_masks(rows, tmp_path / "brain_masks", "auto")
    assert dict(counts) == {"threshold": 1, "model": 1}
    assert out[0].brain_mask is None and out[0].extra == {"brain_mask_source": "threshold"}
    assert out[1].brain_mask == tmp_path / "brain_masks" / "head_brainmask.nii.gz"
    assert out[1].extra == {"brain_mask_source": "model"}
    written = np.asarray(nib.as_closest_canonical(nib.load(out[1].brain_mask)).dataobj) > 0
    assert _dice(written, mni.brain > 0.5) > 0.95
    given = ManifestRow(id="given", image=files["head"], brain_mask=out[1].brain_mask)
    kept, counts = add_model_masks([*rows, given], tmp_path / "none", "never")
    assert [r.brain_mask for r in kept] == [None, None, out[1].brain_mask] and not (tmp_path / "none").exists()
    assert [r.extra["brain_mask_source"] for r in kept] == ["threshold", "threshold", "file"]
    assert dict(counts) == {"threshold": 2, "file": 1}


@pytest.mark.skipif(not HEAD_T1.is_file(), reason=f"{HEAD_T1} is not present on this machine")
def test_a_real_head_gets_an_adult_brain_volume() -> None:
    volume = load_volume(HEAD_T1)
    threshold, source = brain_mask_for(volume, None, "never")
    assert source == "threshold"
    brain, source = brain_mask_for(volume, None, "auto")
    assert source == "model"
    brain_ml = np.count_nonzero(brain) * volume.voxel_ml
    assert 1000 < brain_ml < 1800
    assert np.count_nonzero(threshold) * volume.voxel_ml > 1.8 * brain_ml
    assert np.count_nonzero(brain & ~threshold) < 0.01 * np.count_nonzero(brain)  # the brain lies inside the head
