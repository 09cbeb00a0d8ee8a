"""The synthetic cohort: reproducible, realistically varied subjects with ground truth that matches the image."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
from scipy import ndimage

from phanes_cli.errors import ConfigError, InputError
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.synth import SynthOptions, make_subject, paint_sprites, synth_cohort
from phanes_cli.synth.cohort import healthy_sources, round_robin, source_splits
from phanes_cli.synth.label_maps import load_label_map
from phanes_cli.synth.lesion_bank import folder_bank, npz_bank
from phanes_cli.synth.lesions import LesionConfig, allowed_region, blend_weight, ground_truth_mask, procedural_shape
from phanes_cli.synth.sprites import PERCENTILE_BANDS
from phanes_cli.synth.templates import PACKAGED_TEMPLATES, Template, load_mni152, load_template_file, output_grid
from phanes_cli.synth.variation import VariationConfig, sample_anatomy
from tests.conftest import SHARED_DATA, needs_shared

COARSE = 2.5  # mm: fast subjects for most tests
NO_VARIATION = VariationConfig(rotation_deg=0.0, head_scale=0.0, scale=0.0, translation_mm=0.0, elastic_mm=(0.0, 0.0),
                               ventricle_scale=(1.0, 1.0), atrophy=0.0)
NO_BLUR = VariationConfig(blur_sigma_vox=0.0, thick_slice_probability=0.0)
LESION_DIR = SHARED_DATA / "stroke-lesion-masks"


@pytest.fixture(scope="module")
def mni() -> Template:
    """The bundled template, loaded with every socket connection refused: it must be offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network touched: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        return load_mni152()


@pytest.fixture(scope="module")
def grid(mni: Template):
    return output_grid(mni, COARSE)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _outside_shell(mask: np.ndarray) -> np.ndarray:
    """Voxels more than 2 voxels (Euclidean) from the mask."""
    return ndimage.distance_transform_edt(~mask) > 2.0


def test_output_grid_encloses_the_brain_with_its_margin() -> None:
    """The grid's box is the brain's voxel-centre box in world mm (oracle: every voxel's world position) plus
    the margin, on a flipped, anisotropic template grid."""
    rng = np.random.default_rng(3)
    brain = ndimage.binary_dilation(rng.random((30, 26, 22)) > 0.999, iterations=3)
    affine = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, 2.0, 0.0, -30.0], [0.0, 0.0, 1.2, 5.0], [0, 0, 0, 1.0]])
    template = Template(name="t", image=brain.astype(np.float32), affine=affine, brain=brain.astype(np.float32),
                        tissue=brain.astype(np.float32), to_mni=np.eye(4))
    centres = np.argwhere(brain) @ affine[:3, :3].T + affine[:3, 3]
    grid = output_grid(template, 2.0, margin_mm=5.0)
    np.testing.assert_allclose(grid.affine[:3, 3], centres.min(0) - 5.0)
    far = grid.affine[:3, 3] + 2.0 * (np.array(grid.shape) - 1)
    assert (far >= centres.max(0) + 5.0).all() and (far - 2.0 < centres.max(0) + 5.0).all()


def test_template_is_a_real_brain(mni: Template) -> None:
    template = mni
    brain = template.brain > 0.5
    ml = brain.sum() * abs(np.linalg.det(template.affine[:3, :3])) / 1000
    assert 1200 < ml < 2200, ml  # an adult brain (nilearn's mask is generous)
    assert np.median(template.image[(template.tissue > 0.9) & brain]) > 0.6  # GM/WM, white matter ~ 1
    assert template.image[~brain].max() == 0.0


def test_same_seed_same_subject_other_seed_differs(mni: Template, grid) -> None:
    a = make_subject(mni, grid, seed=7, index=0, kind="stroke")
    b = make_subject(mni, grid, seed=7, index=0, kind="stroke")
    c = make_subject(mni, grid, seed=8, index=0, kind="stroke")
    assert a.image.tobytes() == b.image.tobytes()
    assert a.lesion.tobytes() == b.lesion.tobytes()  # type: ignore[union-attr]
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.lesion, c.lesion)


def test_healthy_subjects_vary_but_stay_brains(mni: Template, grid) -> None:
    reference = sample_anatomy(mni, grid, np.random.default_rng(0), NO_VARIATION)
    # identity transform: the template itself on the grid (checks the no-variation path is exact)
    assert reference.brain.sum() > 0 and np.allclose(reference.source_world, grid.world(), atol=1e-3)
    subjects = [make_subject(mni, grid, seed=0, index=i) for i in range(3)]
    for s in subjects:
        assert s.lesion is None and s.image.dtype == np.float32 and s.image.shape == grid.shape
        assert s.image[~s.brain].max() == 0.0  # skull-stripped background
        assert 0.7 < _corr(s.image, reference.image) < 0.995
        overlap = (s.brain & reference.brain).sum() / (s.brain | reference.brain).sum()
        assert 0.75 < overlap < 0.995  # moved and deformed, still the same anatomy
    for i in range(3):
        for j in range(i + 1, 3):
            assert 0.6 < _corr(subjects[i].image, subjects[j].image) < 0.99
            assert not np.array_equal(subjects[i].brain, subjects[j].brain)


def test_stroke_mask_describes_the_intensity_change(mni: Template, grid) -> None:
    for index in range(3):
        s = make_subject(mni, grid, seed=1, index=index, kind="stroke", keep_base=True, variation=NO_BLUR)
        assert s.lesion is not None and s.base is not None and s.lesion.any()
        assert (s.lesion <= s.brain).all()
        inside = s.image[s.lesion].mean()
        far = _outside_shell(s.lesion)
        assert inside < 0.75 * s.base[s.lesion].mean()
        assert inside < 0.8 * s.image[s.brain & far].mean()
        # without scanner blur nothing beyond the 2-voxel shell changes at all (same noise draw)
        assert np.array_equal(s.image[far], s.base[far])


def test_stroke_change_stays_local_with_blur(mni: Template, grid) -> None:
    for index in range(3):
        s = make_subject(mni, grid, seed=2, index=index, kind="stroke", keep_base=True)
        far = _outside_shell(s.lesion) & s.brain  # type: ignore[arg-type]
        diff = np.abs(s.image - s.base)[far]  # type: ignore[operator]
        level = np.median(s.base[s.brain])  # type: ignore[index]
        # blur spreads a little contrast past the shell; it stays below the noise (>= 1% of WM)
        assert np.mean(diff > 0.03 * level) < 1e-3


@pytest.fixture(scope="module")
def fine_anatomy(mni: Template):
    return sample_anatomy(mni, output_grid(mni, 1.5), np.random.default_rng(5), VariationConfig())


@pytest.mark.parametrize("target_ml", [0.5, 5.0, 80.0])
def test_procedural_lesion_volume_tracks_target(fine_anatomy, target_ml: float) -> None:
    cfg = LesionConfig()
    for seed in range(2):
        core = procedural_shape(fine_anatomy, target_ml, np.random.default_rng(seed), cfg)
        ml = core.sum() * fine_anatomy.grid.voxel_ml
        assert 0.8 * target_ml <= ml <= 1.5 * target_ml, (target_ml, ml)
        assert (core <= allowed_region(fine_anatomy)).all()
        assert ndimage.label(core)[1] == 1
        assert np.array_equal(ground_truth_mask(blend_weight(core, fine_anatomy, cfg), fine_anatomy), core)


@needs_shared()
def test_real_lesion_shapes_land_where_mni_says(mni: Template, grid, tmp_path: Path) -> None:
    if not LESION_DIR.is_dir():
        pytest.skip(f"{LESION_DIR} is not present")
    bank = folder_bank(LESION_DIR)
    for index in range(3):
        s = make_subject(mni, grid, seed=3, index=index, kind="stroke", lesion_shapes=bank, variation=NO_VARIATION)
        assert s.lesion is not None and s.lesion.any() and (s.lesion <= s.brain).all()
        (name,) = s.lesion_sources
        # independent resampling of the LAS mask onto the RAS grid by nibabel (no deformation here)
        expected = nibabel.processing.resample_from_to(nib.load(LESION_DIR / name), (grid.shape, grid.affine), order=0)
        expected_mask = np.asarray(expected.dataobj) > 0.5
        anatomy = sample_anatomy(mni, grid, np.random.default_rng(0), NO_VARIATION)
        expected_mask &= allowed_region(anatomy)
        dice = 2 * (s.lesion & expected_mask).sum() / (s.lesion.sum() + expected_mask.sum())
        print(f"{name}: {s.lesion.sum()} voxels, Dice with nibabel's resampling {dice:.2f}")
        assert dice > 0.8, (name, dice)  # a left-right or axis mix-up would drop it near 0


def test_paint_sprites_protocol(mni: Template, grid) -> None:
    s = make_subject(mni, grid, seed=4, index=0)
    z = np.flatnonzero(s.brain.sum(axis=(0, 1)) > 0.3 * s.brain.sum(axis=(0, 1)).max())
    pick = z[:: max(1, len(z) // 12)][:12]
    images = np.moveaxis(s.image[:, :, pick], 2, 0) / s.image.max()
    brain = np.moveaxis(s.brain[:, :, pick], 2, 0)
    painted, masks = paint_sprites(images, brain, np.random.default_rng(0))
    assert painted.shape == images.shape and masks.dtype == bool
    assert (masks <= brain).all()
    assert np.array_equal(painted[~masks], images[~masks].astype(np.float32))
    three = 0
    for img, out, m, b in zip(images, painted, masks, brain, strict=True):
        assert m.any()
        values = np.unique(out[m])
        assert 1 <= len(values) <= 3  # one constant intensity per ellipse
        three += len(values) == 3
        bands = [np.percentile(img[b], band) for band in PERCENTILE_BANDS]
        for v in values:
            assert any(lo - 1e-6 <= v <= hi + 1e-6 for lo, hi in bands), (v, bands)
    assert three >= len(images) // 2  # overlaps may hide one ellipse, rarely
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paint_sprites(images * 2.0, brain, np.random.default_rng(0))


def test_sprite_subject_changes_only_its_mask(mni: Template, grid) -> None:
    s = make_subject(mni, grid, seed=0, index=0, kind="sprites", keep_base=True)
    assert s.lesion is not None and s.lesion.any() and (s.lesion <= s.brain).all()
    assert np.array_equal(s.image[~s.lesion], s.base[~s.lesion])  # type: ignore[index]
    painted_slices = np.flatnonzero(s.lesion.any(axis=(0, 1)))
    brain_slices = np.flatnonzero(s.brain.any(axis=(0, 1)))
    assert 0.2 < len(painted_slices) / len(brain_slices) < 0.6  # the central band only


def test_cohort_on_disk_and_manifest(tmp_path: Path) -> None:
    messages: list[str] = []
    start = time.perf_counter()
    manifest = synth_cohort(SynthOptions(tmp_path / "c", healthy=3, lesions=2, kind="stroke", seed=11, voxel_size=3.0),
                            progress=messages.append)
    seconds = (time.perf_counter() - start) / 5
    print(f"synth: {seconds:.2f} s per subject at 3 mm (template load included)")
    rows = read_manifest(manifest)
    assert [r.id for r in rows] == ["healthy-0000", "healthy-0001", "healthy-0002", "stroke-0000", "stroke-0001"]
    # one subject per source in round-robin order: train, val, test (a healthy control); lesions on test sources
    assert [r.split for r in rows] == ["train", "val", "test", "test", "test"]
    sources = ["nilearn-mni152-2009a", "antspy_colin27_ch2_T1", "niimath_adult_T1", "niimath_adult_T1",
               "niivue_fs_norm_T1"]  # lesion subjects alternate over the two test brains
    assert [r.extra["source"] for r in rows] == sources and {r.extra["source_kind"] for r in rows} == {"image"}
    assert [r.kind for r in rows] == ["healthy"] * 3 + ["stroke"] * 2
    assert messages == [f"{r.id} ({k}/5)" for k, r in enumerate(rows, start=1)]  # one call per subject
    # a subject depends on (seed, index) only, not on how many subjects the cohort has
    norm = load_template_file(PACKAGED_TEMPLATES / "niivue_fs_norm_T1.nii.gz", load_mni152())
    alone = make_subject(norm, output_grid(norm, 3.0), seed=11, index=1, kind="stroke", lesion_shapes=npz_bank())
    on_disk = next(r for r in rows if r.id == "stroke-0001")
    assert np.array_equal(np.asarray(nib.load(on_disk.image).dataobj), alone.image)
    for r in rows:
        img = nib.load(r.image)
        brain = nib.load(r.brain_mask)
        assert img.get_data_dtype() == np.float32 and brain.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, brain.affine) and r.extra["seed"] == 11
        if r.kind == "healthy":
            assert r.lesion_mask is None and r.lesion_ml is None
            continue
        label = nib.load(r.lesion_mask)
        voxels = int(np.asarray(label.dataobj).sum())
        voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert label.get_data_dtype() == np.uint8 and voxels > 0
        assert r.lesion_ml == pytest.approx(voxels * voxel_ml)
        assert r.extra["lesion_source"] in npz_bank().names  # a real shape from the shipped bank


def test_splits_by_source_brain() -> None:
    names = ["mni", "colin", "adult", "icbm", "extra"]
    splits = source_splits(names, val=("colin",), test=("adult",))
    assert splits == {"mni": "train", "colin": "val", "adult": "test", "icbm": "train", "extra": "train"}
    assert [names[i] for i in round_robin(names, splits)] == ["mni", "colin", "adult", "icbm", "extra"]
    two = source_splits(names, val=("mni", "extra"), test=("icbm",))
    assert [names[i] for i in round_robin(names, two)] == ["colin", "mni", "icbm", "adult", "extra"]
    with pytest.raises(ConfigError, match="unknown source brain"):
        source_splits(names, val=("nope",), test=("adult",))
    with pytest.raises(ConfigError, match="both val and test"):
        source_splits(names, val=("adult",), test=("adult",))
    with pytest.raises(ConfigError, match="at least one for training"):
        source_splits(names[:2], val=("mni",), test=("colin",))


def test_invalid_requests_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="negative"):
        synth_cohort(SynthOptions(tmp_path, healthy=-1, lesions=1))
    with pytest.raises(ConfigError, match="nothing to make"):
        synth_cohort(SynthOptions(tmp_path, healthy=0, lesions=0))
    with pytest.raises(ConfigError, match="unknown --kind"):
        synth_cohort(SynthOptions(tmp_path, healthy=1, lesions=1, kind="tumour"))
    with pytest.raises(ConfigError, match="--kind stroke"):
        synth_cohort(SynthOptions(tmp_path, healthy=1, lesions=1, kind="sprites", lesion_shapes=tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI"):
        synth_cohort(SynthOptions(tmp_path / "out", healthy=1, lesions=1, lesion_shapes=tmp_path / "empty"))
    with pytest.raises(InputError, match="not found"):
        synth_cohort(SynthOptions(tmp_path / "out", healthy=1, lesions=0, templates=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="voxel size"):
        synth_cohort(SynthOptions(tmp_path, healthy=1, lesions=0, voxel_size=0.1))
    with pytest.raises(ConfigError, match="unknown --lesion-source"):
        synth_cohort(SynthOptions(tmp_path, healthy=1, lesions=1, lesion_source="drawn"))
    with pytest.raises(ConfigError, match="--lesion-source real"):
        synth_cohort(SynthOptions(tmp_path, healthy=1, lesions=1, lesion_source="procedural", lesion_shapes=tmp_path))
    with pytest.raises(ConfigError, match="unknown source brain"):  # checked before any template is loaded
        synth_cohort(SynthOptions(tmp_path / "out", healthy=1, lesions=0, test_sources=("nope",)))


def test_a_bad_extra_template_fails_before_anything_is_written(tmp_path: Path) -> None:
    """Shipped templates load when first used; a user's --templates are read at once: a one-subject cohort that
    would never draw the bad file still refuses it, naming it, with nothing written."""
    extra = tmp_path / "extra"
    extra.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(extra / "blank.nii.gz"))
    with pytest.raises(InputError, match=r"blank\.nii\.gz.*no brain found"):
        synth_cohort(SynthOptions(tmp_path / "out", healthy=1, lesions=0, templates=extra, voxel_size=4.0))
    assert not (tmp_path / "out").exists()


@needs_shared()
def test_extra_template_in_las_orientation_matches_mni(mni: Template, grid) -> None:
    path = SHARED_DATA / "healthy-t1" / "antspy_mni152_T1.nii.gz"
    extra = load_template_file(path, mni)
    ml = (extra.brain > 0.5).sum() * abs(np.linalg.det(extra.affine[:3, :3])) / 1000
    assert 1200 < ml < 2200, ml
    assert np.allclose(np.diag(extra.to_mni)[:3], 1.0, atol=0.05)
    ours = sample_anatomy(extra, grid, np.random.default_rng(0), NO_VARIATION)
    theirs = sample_anatomy(mni, grid, np.random.default_rng(0), NO_VARIATION)
    # the same MNI brain from a LAS file lands on the RAS grid the right way round (compared inside the brain)
    inside = theirs.brain
    assert _corr(ours.image[inside], theirs.image[inside]) > 0.7
    assert _corr(ours.image[inside], theirs.image[:, ::-1][inside]) < 0.5  # anterior-posterior swapped
    assert _corr(ours.image[inside], theirs.image[:, :, ::-1][inside]) < 0.5  # inferior-superior swapped


def test_healthy_sources_cycle_and_label_map_fraction() -> None:
    """One train, val, test source first, then the other held-out brains, then train slots to 60% of the cycle;
    a train slot is a label map in the asked fraction (deterministically spread); label maps never reach val/test."""
    names = ["mni", "icbm", "colin", "forrest", "adult", "norm", "lm1", "lm2"]
    splits = source_splits(names, val=("colin", "forrest"), test=("adult", "norm"))
    picks = healthy_sources(30, names, splits, {"lm1", "lm2"}, fraction=0.5)
    first = [names[i] for i in picks[:10]]
    assert first[:5] == ["mni", "colin", "adult", "forrest", "norm"]
    assert [splits[n] for n in first].count("train") == 6  # 60% of the cycle
    train = [names[i] for i in picks if splits[names[i]] == "train"]
    assert sum(n.startswith("lm") for n in train) == len(train) // 2  # the fraction, exactly on a prefix
    assert {n for n in train if n.startswith("lm")} == {"lm1", "lm2"} and {"mni", "icbm"} <= set(train)
    assert all(not names[i].startswith("lm") for i in healthy_sources(30, names, splits, {"lm1", "lm2"}, 0.0))
    only = healthy_sources(30, names, splits, {"lm1", "lm2"}, 1.0)
    assert {names[i] for i in only if splits[names[i]] == "train"} == {"lm1", "lm2"}
    # a label map named as a validation source is an ordinary val source, not part of the training pool
    moved = source_splits(names, val=("colin", "lm2"), test=("adult", "norm"))
    picks = healthy_sources(30, names, moved, {"lm1", "lm2"}, fraction=1.0)
    assert {names[i] for i in picks if moved[names[i]] == "train"} == {"lm1"} and "lm2" in {names[i] for i in picks}


def test_label_map_fraction_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="label-map-fraction"):
        synth_cohort(SynthOptions(tmp_path / "c", healthy=1, lesions=0, label_map_fraction=1.5))


def test_label_map_subject_is_a_skull_stripped_t1(tmp_path: Path) -> None:
    """A healthy subject from a label map: white matter brightest large class, CSF dark, zero outside the brain."""
    source = load_label_map("synthseg_training_seg_07", load_mni152())
    subject = make_subject(source, output_grid(source, 2.0), seed=4, index=0)
    values = subject.image[subject.brain]
    assert subject.image[~subject.brain].max() == 0 and subject.template == "synthseg_training_seg_07"
    wm = np.percentile(values, 85)
    assert np.percentile(values, 5) < 0.55 * wm  # CSF and ventricles are dark
    assert 900 < subject.brain.sum() * 8 / 1000 < 2300  # mL at 2 mm, head-size variation included


def test_cli_bad_label_map_fraction_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "phanes_cli.cli", "data", "synth", "--out", str(tmp_path / "c"),
                          "--healthy", "1", "--lesions", "0", "--label-map-fraction", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--label-map-fraction must lie between 0 and 1, got 2.0" in run.stderr
    assert [line for line in run.stderr.splitlines() if "error" in line.lower()] == [
        "error: --label-map-fraction must lie between 0 and 1, got 2.0"]  # one line, no traceback
    assert not (tmp_path / "c").exists()
