"""Input quality checks on real files: clean brains pass; empty, noise, thick-slice, wrong-size, skull-on are flagged.

Oracles: the flags are asserted on inputs built to violate exactly one documented limit (a synthetic head
is the real MNI152 brain with CSF, skull and scalp layers added at distances computed here with scipy),
and on real skull-stripped brains vs a real head with its skull.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import Volume, load_volume, save_nifti
from phanes_cli.inputs.quality import FATAL, FLAGS, check_volume
from phanes_cli.synth.templates import Template, load_mni152
from tests.conftest import SHARED_DATA, blob_volume, needs_shared


def _volume(tmp_path: Path, data: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Volume:
    return load_volume(save_nifti(data.astype(np.float32), np.diag([*zooms, 1.0]), tmp_path / "v.nii"))


@pytest.fixture(scope="module")
def mni() -> Template:
    return load_mni152()


@pytest.fixture(scope="module")
def gap(mni: Template) -> np.ndarray:
    return ndimage.distance_transform_edt(mni.brain < 0.5)  # 1 mm voxels: distance in mm from the brain


def _head(mni: Template, gap: np.ndarray, skull_level: float) -> np.ndarray:
    """The MNI152 brain inside 2 mm of CSF, 6 mm of skull at `skull_level` and 6 mm of bright scalp."""
    head = mni.image.copy()
    head[(gap > 0) & (gap <= 2)] = 0.1
    head[(gap > 2) & (gap <= 8)] = skull_level
    head[(gap > 8) & (gap <= 14)] = 1.2  # scalp fat is brighter than white matter (1.0) on T1
    return head


def test_flags_are_documented_and_fatal_ones_are_flags() -> None:
    assert set(FLAGS) >= FATAL
    assert all(FLAGS.values())


def test_the_template_brain_is_clean_with_either_mask(mni: Template, tmp_path: Path) -> None:
    vol = _volume(tmp_path, mni.image)
    assert check_volume(vol, mni.brain > 0.5) == []
    assert check_volume(vol, auto_brain_mask(vol.data)) == []


@pytest.mark.parametrize("skull_level", [0.03, 0.3], ids=["dark_skull", "grey_skull"])
def test_a_synthetic_head_is_flagged_as_skull_present(skull_level: float, mni: Template, gap: np.ndarray,
                                                       tmp_path: Path) -> None:
    vol = _volume(tmp_path, _head(mni, gap, skull_level))
    assert "skull_present" in check_volume(vol, mni.brain > 0.5)  # tissue outside a correct brain mask
    # the same correct mask from a file or from brain extraction: the skull is left out, nothing to flag
    assert "skull_present" not in check_volume(vol, mni.brain > 0.5, "file")
    assert "skull_present" not in check_volume(vol, mni.brain > 0.5, "model")
    # an automatic mask stops at a dark skull, or takes in the whole head through a grey one
    assert "skull_present" in check_volume(vol, auto_brain_mask(vol.data))


@needs_shared()
@pytest.mark.parametrize("name", sorted(p.name for p in (SHARED_DATA / "healthy-t1").glob("*.nii.gz")) or ["absent"])
def test_real_skull_stripped_brains_pass(name: str) -> None:
    vol = load_volume(SHARED_DATA / "healthy-t1" / name)
    assert check_volume(vol, auto_brain_mask(vol.data)) == []


HEAD = SHARED_DATA / "head-t1" / "niivue_otsu_head_T1.nii.gz"


@pytest.mark.skipif(not HEAD.is_file(), reason="../shared/data/head-t1 is not present")
def test_a_real_head_with_its_skull_is_flagged() -> None:
    vol = load_volume(HEAD)
    flags = check_volume(vol, auto_brain_mask(vol.data))
    assert "skull_present" in flags and "brain_volume_high" in flags  # the automatic mask takes the whole head
    assert not FATAL & set(flags)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "magnitude"])
def test_pure_noise_is_flagged_with_any_mask(kind: str, mni: Template, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shape = mni.image.shape
    noise = {"uniform": lambda: rng.random(shape), "gaussian": lambda: rng.normal(0, 1, shape),
             "magnitude": lambda: np.abs(rng.normal(0, 1, shape))}[kind]()  # only this case's 7 M voxels
    vol = _volume(tmp_path, noise)
    assert "intensity_noise" in check_volume(vol, auto_brain_mask(vol.data))
    assert "intensity_noise" in check_volume(vol, mni.brain > 0.5)


def test_a_noisy_but_real_brain_is_not_noise(mni: Template, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    noisy = mni.image + rng.normal(0, 0.15 * float(mni.image.max()), mni.image.shape)
    assert "intensity_noise" not in check_volume(_volume(tmp_path, noisy), mni.brain > 0.5)


@pytest.mark.parametrize(
    ("data", "flag"),
    [(np.zeros((40, 48, 36)), "all_zero"), (np.full((40, 48, 36), 7.0), "constant"),
     (blob_volume(), "empty_brain_mask")],
)
def test_volumes_with_nothing_to_screen_are_fatal(data: np.ndarray, flag: str, tmp_path: Path) -> None:
    vol = _volume(tmp_path, data)
    brain = np.zeros(data.shape, bool) if flag == "empty_brain_mask" else auto_brain_mask(vol.data)
    assert check_volume(vol, brain) == [flag] and flag in FATAL


@pytest.mark.parametrize(
    ("zooms", "expected"),
    [
        ((0.5, 0.5, 6.0), {"voxel_too_large", "voxel_anisotropic"}),
        ((1.0, 1.0, 3.0), set()),  # at the limits: 3.0 mm and anisotropy 3
        ((1.0, 1.0, 3.5), {"voxel_too_large"}),
        ((0.2, 0.2, 0.2), {"voxel_too_small"}),
        ((0.5, 0.5, 2.5), {"voxel_anisotropic"}),
    ],
)
def test_voxel_size_limits(zooms: tuple[float, float, float], expected: set[str], tmp_path: Path) -> None:
    flags = set(check_volume(_volume(tmp_path, blob_volume(), zooms), blob_volume() > 0))
    assert flags & {"voxel_too_large", "voxel_too_small", "voxel_anisotropic"} == expected


@pytest.mark.parametrize(("voxel_mm", "flag"), [(0.7, "brain_volume_low"), (1.15, "brain_volume_high")])
def test_brain_volume_limits(voxel_mm: float, flag: str, mni: Template, tmp_path: Path) -> None:
    brain = mni.brain > 0.5
    brain_ml = brain.sum() * voxel_mm**3 / 1000  # the oracle: the same brain at another voxel size
    assert (brain_ml < 800) if flag.endswith("low") else (brain_ml > 2200)
    assert flag in check_volume(_volume(tmp_path, mni.image, (voxel_mm,) * 3), brain)


def test_a_file_without_orientation_is_flagged(tmp_path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(blob_volume(), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "no_affine.nii"))
    vol = load_volume(tmp_path / "no_affine.nii")
    assert "no_affine" in check_volume(vol, vol.data > 0)


def _flags_as_screened(image: Path, mask: Path | None, skull_strip: str) -> tuple[list[str], str]:
    """QC flags as screening computes them: load_with_brain (mask file, deepbet or threshold), then check_volume."""
    from phanes_cli.inputs.brain_masks import load_with_brain

    volume, brain, source = load_with_brain(image, mask, skull_strip=skull_strip)
    return check_volume(volume, brain, source), source


STRIPPED = sorted([*(SHARED_DATA / "healthy-t1").glob("*.nii.gz"), *(SHARED_DATA / "glioma-t1").glob("*/T1.nii.gz")])


@needs_shared()
@pytest.mark.parametrize("image", STRIPPED or [Path("absent")], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_stripped_brains_with_supplied_masks_are_not_flagged(image: Path, tmp_path: Path) -> None:
    """Skull-stripped healthy and glioma brains: no skull flag with the automatic mask, the stripping tool's
    mask (image > 0) or a mask 3 mm tighter than the brain, both supplied as files."""
    flags, source = _flags_as_screened(image, None, "auto")
    assert source == "threshold" and "skull_present" not in flags
    volume = load_volume(image)
    nonzero = volume.data > 0
    tight = ndimage.binary_erosion(auto_brain_mask(volume.data), iterations=3)
    for name, mask in (("nonzero", nonzero), ("tight", tight)):
        path = save_nifti(volume.to_native(mask).astype(np.uint8), volume.native_affine, tmp_path / f"{name}.nii.gz")
        flags, source = _flags_as_screened(image, path, "auto")
        assert source == "file" and "skull_present" not in flags, name
        assert "negative_intensities" not in flags, name  # TCGA-DU-7294 has a few negative voxels (ringing)


@needs_shared()
@pytest.mark.parametrize("background", ["zero", "standardised"])
def test_a_z_scored_real_brain_is_flagged_with_its_mask_or_the_threshold_mask(background: str, tmp_path: Path
                                                                             ) -> None:
    """A real glioma T1 z-scored over its brain (BraTS-style preparation), the background left at 0 or
    standardised with it: flagged `negative_intensities` with the brain mask given and with the threshold mask."""
    image = SHARED_DATA / "glioma-t1" / "TCGA-DU-7294" / "T1.nii.gz"
    volume = load_volume(image)
    native = volume.to_native(volume.data)
    brain = native > 0  # the stripping tool's mask
    z = (native - native[brain].mean()) / native[brain].std()
    z = np.where(brain, z, 0.0) if background == "zero" else z
    assert 0.3 < float((z[brain] < 0).mean()) < 0.7  # the oracle: about half the brain below 0
    scored = save_nifti(z.astype(np.float32), volume.native_affine, tmp_path / "z.nii")
    mask = save_nifti(brain.astype(np.uint8), volume.native_affine, tmp_path / "brain.nii")
    for given, skull_strip, expected in ((mask, "auto", "file"), (None, "never", "threshold")):
        flags, source = _flags_as_screened(scored, given, skull_strip)
        assert source == expected and "negative_intensities" in flags, (source, flags)


@needs_shared()
@pytest.mark.slow  # deepbet on a real head: ~40 s on one core
@pytest.mark.skipif(not HEAD.is_file(), reason="../shared/data/head-t1 is not present")
def test_real_head_flagged_only_while_its_skull_is_in_the_mask(tmp_path: Path) -> None:
    """The real head: flagged with the threshold mask (stripping skipped); not after deepbet has stripped it,
    nor with deepbet's mask supplied as a file (the scalp lies outside the mask, where screening never looks)."""
    flags, source = _flags_as_screened(HEAD, None, "never")
    assert source == "threshold" and "skull_present" in flags
    from phanes_cli.inputs.brain_masks import load_with_brain

    volume, brain, source = load_with_brain(HEAD, None, skull_strip="auto")  # deepbet runs once, for both cases
    assert source == "model" and check_volume(volume, brain, source) == []
    path = save_nifti(volume.to_native(brain).astype(np.uint8), volume.native_affine, tmp_path / "deepbet.nii")
    flags, source = _flags_as_screened(HEAD, path, "auto")
    assert source == "file" and flags == []
