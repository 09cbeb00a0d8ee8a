"""Real anatomy by default: shipped T1s split by source brain, shipped real lesion shapes, wider variation."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.synth.cohort import synth_cohort
from phanes_cli.synth.lesion_bank import PACKAGED_BANK, build_bank, folder_bank, npz_bank, pick_by_volume
from phanes_cli.synth.options import DEFAULT_TEST_SOURCES, DEFAULT_VAL_SOURCES, SynthOptions
from phanes_cli.synth.templates import PACKAGED_TEMPLATES
from phanes_cli.synth.variation import VariationConfig, _ventricle_warp, acquire, atrophy
from tests.conftest import SHARED_DATA, needs_shared

LESION_DIR = SHARED_DATA / "stroke-lesion-masks"


def _world_points(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, ...]]:
    idx = np.argwhere(mask).astype(np.float64)
    return {tuple(p) for p in np.round(idx @ affine[:3, :3].T + affine[:3, 3], 3)}


def test_shipped_bank_spans_real_sizes() -> None:
    bank = npz_bank()
    assert 250 <= len(bank) <= 400 and len(set(bank.names)) == len(bank)
    volumes = []
    for i in range(len(bank)):
        shape = bank.get(i)
        volumes.append(shape.mask.sum() * abs(np.linalg.det(shape.affine[:3, :3])) / 1000.0)  # numpy oracle
        assert shape.mask.dtype == bool and shape.mask.any()
    volumes_ml = np.array(volumes)
    assert (volumes_ml < 1.0).sum() >= 20 and (volumes_ml > 50.0).sum() >= 20  # both tails, not just the middle
    assert ((volumes_ml >= 1.0) & (volumes_ml <= 10.0)).sum() >= 40
    assert PACKAGED_BANK.stat().st_size < 3_000_000  # compact enough to ship


@needs_shared()
def test_shipped_shapes_are_the_original_masks_in_world_space() -> None:
    if not LESION_DIR.is_dir():
        pytest.skip(f"{LESION_DIR} is not present")
    bank = npz_bank()
    for i in (0, len(bank) // 2, len(bank) - 1):  # smallest, median, largest
        shape = bank.get(i)
        original = nib.load(LESION_DIR / shape.name)
        expected = _world_points(np.asarray(original.dataobj) > 0.5, original.affine)
        assert _world_points(shape.mask, shape.affine) == expected, shape.name


def test_pick_by_volume_keeps_the_distribution_and_its_extremes() -> None:
    volumes = np.random.default_rng(0).lognormal(1.0, 1.5, 500)
    picked = pick_by_volume(volumes, 50)
    assert len(picked) == 50 and len(set(picked.tolist())) == 50
    assert volumes[picked].min() == volumes.min() and volumes[picked].max() == volumes.max()
    assert np.all(np.diff(volumes[picked]) >= 0)
    # evenly spaced ranks: the picked median is the population median (within one rank step)
    ranks = np.searchsorted(np.sort(volumes), volumes[picked])
    assert np.abs(np.diff(ranks) - 499 / 49).max() <= 1.0


def test_build_bank_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    affine = np.array([[-2.0, 0, 0, 40], [0, 2, 0, -50], [0, 0, 2, -30], [0, 0, 0, 1]])  # LAS, like the SOOP masks
    src = tmp_path / "masks"
    src.mkdir()
    masks = {}
    for k, size in enumerate((1, 3, 6, 9)):
        mask = np.zeros((20, 22, 18), dtype=np.uint8)
        corner = rng.integers(0, 8, 3)
        mask[tuple(slice(c, c + size) for c in corner)] = 1
        masks[f"m{k}.nii.gz"] = mask
        nib.save(nib.Nifti1Image(mask, affine), str(src / f"m{k}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 18), np.uint8), affine), str(src / "empty.nii.gz"))
    bank = npz_bank(build_bank(src, tmp_path / "bank.npz", count=3))
    assert list(bank.names) == ["m0.nii.gz", "m2.nii.gz", "m3.nii.gz"]  # smallest, middle, largest; empty dropped
    for i, name in enumerate(bank.names):
        shape = bank.get(i)
        assert _world_points(shape.mask, shape.affine) == _world_points(masks[name] > 0, affine)
    assert len(folder_bank(src)) == 5  # the folder itself, empty mask included


def test_shipped_templates_and_notice() -> None:
    files = sorted(p.name for p in PACKAGED_TEMPLATES.glob("*.nii.gz"))
    assert files == ["antspy_colin27_ch2_T1.nii.gz", "antspy_mni152_T1.nii.gz", "niimath_adult_T1.nii.gz",
                     "niivue_fs_norm_T1.nii.gz", "niivue_icbm2009_T1.nii.gz", "studyforrest_T1w_brain.nii.gz"]
    notice = (PACKAGED_TEMPLATES.parent / "NOTICE").read_text()
    for words in ("CC0", "Apache-2.0", "BSD-2-Clause", "PDDL", "SynthSeg", "synthseg_label_maps.npz",
                  "Stroke Outcome Optimization Project", *files):
        assert words in notice, words
    data_mb = sum(p.stat().st_size for p in PACKAGED_TEMPLATES.parent.rglob("*") if p.is_file()) / 1e6
    # the package's data stays a few tens of MB: with the ImageNet/LPIPS weights (39 MB), MNI152 (11 MB) and the
    # shipped cpu model (8 MB) 81 MB
    assert data_mb < 90, data_mb
    if (SHARED_DATA / "healthy-t1").is_dir():
        for name in files[:-1]:  # shipped unchanged (the StudyForrest brain is skull-stripped here, see NOTICE)
            ours = hashlib.sha256((PACKAGED_TEMPLATES / name).read_bytes()).hexdigest()
            theirs = hashlib.sha256((SHARED_DATA / "healthy-t1" / name).read_bytes()).hexdigest()
            assert ours == theirs, name


@pytest.mark.slow
def test_cohort_splits_by_source_brain(tmp_path: Path) -> None:
    """Every source brain lands in one split only; lesions sit in test brains; a shipped copy is not a new source."""
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(PACKAGED_TEMPLATES / "antspy_mni152_T1.nii.gz", extra / "copy_of_mni152.nii.gz")
    manifest = synth_cohort(SynthOptions(tmp_path / "c", healthy=7, lesions=2, seed=3, voxel_size=4.0,
                                         templates=extra))
    rows = read_manifest(manifest)
    by_source: dict[str, set[str]] = {}
    for r in rows:
        by_source.setdefault(r.extra["source"], set()).add(r.split)
    assert "copy_of_mni152" not in by_source  # the byte-identical copy was skipped
    assert all(len(splits) == 1 for splits in by_source.values()), by_source
    # both validation brains and both test brains appear in the first cycle, each in its split only
    assert all(by_source[n] == {"val"} for n in DEFAULT_VAL_SOURCES)
    assert all(by_source[n] == {"test"} for n in DEFAULT_TEST_SOURCES)
    label_rows = [r for r in rows if r.extra["source_kind"] == "label_map"]
    assert label_rows and all(r.split == "train" and r.extra["source"].startswith("synthseg_") for r in label_rows)
    healthy_test = [r for r in rows if r.kind == "healthy" and r.split == "test"]
    assert healthy_test and all(r.lesion_mask is None for r in healthy_test)  # healthy controls
    lesion_rows = [r for r in rows if r.kind == "stroke"]
    assert all(r.split == "test" and r.extra["source"] in DEFAULT_TEST_SOURCES for r in lesion_rows)
    assert all(r.extra["lesion_source"] in npz_bank().names for r in lesion_rows)


def test_ventricle_warp_magnifies_at_the_centre() -> None:
    centre = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    offsets = np.array([[0.5, 0, 0], [0, -0.5, 0], [0, 0, 0.3]], dtype=np.float32).T  # (3, 3) near the centre
    points = (centre[:, None] + offsets)[:, :, None, None]
    for k in (0.85, 1.6):
        source = _ventricle_warp(points.copy(), centre, k, 22.0)
        # near the centre the map is p -> c + (p - c) / k: a structure there appears k times larger
        np.testing.assert_allclose(source[:, :, 0, 0] - centre[:, None], offsets / k, rtol=1e-3)
    radius = np.linspace(0.0, 120.0, 2000, dtype=np.float32)
    line = np.stack([radius, 0 * radius, 0 * radius])[:, :, None, None] + centre[:, None, None, None]
    for k in (0.85, 1.6):
        mapped = _ventricle_warp(line.copy(), centre, k, 22.0)[0, :, 0, 0] - centre[0]
        assert np.all(np.diff(mapped) > 0)  # monotone: no folding
        assert abs(mapped[-1] - radius[-1]) < 1e-3  # far from the ventricles nothing moves


def test_atrophy_widens_csf_only_and_contrast_keeps_order() -> None:
    image = np.ones((12, 12, 12), dtype=np.float32)
    image[5:7, :, :] = 0.2  # a CSF sheet (a sulcus) in white matter
    brain = np.ones(image.shape, dtype=bool)
    out = atrophy(image, brain, 0.5)
    assert np.all(out <= image) and np.array_equal(atrophy(image, brain, 0.0), image)
    assert np.allclose(out[4], 0.6) and np.allclose(out[7], 0.6) and np.array_equal(out[:4], image[:4])
    values = np.linspace(0.0, 1.6, 50, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    cfg = VariationConfig(bias_log_std=(0.0, 0.0), blur_sigma_vox=0.0, thick_slice_probability=0.0,
                          noise_std=(0.0, 0.0))
    for seed in range(5):
        scanned = acquire(values, np.ones(values.shape, bool), np.random.default_rng(seed), cfg)[:, 0, 0]
        assert np.all(np.diff(scanned) > 0)  # contrast changes never swap tissue order
