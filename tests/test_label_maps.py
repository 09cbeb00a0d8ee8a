"""T1-like brains from label maps (synth.label_maps) against a real T1 and its own label map, and the shipped data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from phanes_cli.synth.label_maps import PACKAGED_LABEL_MAPS, LabelMap, label_map_names, load_label_map

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_T1 = SHARED / "healthy-t1" / "niivue_fs_norm_T1.nii.gz"
REAL_LABELS = SHARED / "label-maps" / "niivue_fs_norm_aparc.a2009s+aseg.nii.gz"
# FreeSurfer label groups (left, right) compared between the real and the synthetic image
GROUPS = {"white matter": (2, 41), "cortex": (3, 42), "lateral ventricles": (4, 43), "thalamus": (10, 49),
          "caudate": (11, 50), "putamen": (12, 51), "pallidum": (13, 52), "hippocampus": (17, 53),
          "cerebellar white matter": (7, 46), "cerebellar cortex": (8, 47), "brainstem": (16,)}


def _ratios(image: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Median intensity of each group over the white-matter median: contrast independent of scanner units."""
    wm = float(np.median(image[np.isin(labels, GROUPS["white matter"])]))
    return {name: float(np.median(image[np.isin(labels, group)])) / wm for name, group in GROUPS.items()}


@pytest.fixture(scope="module")
def real_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not (REAL_T1.exists() and REAL_LABELS.exists()):
        pytest.skip(f"real T1 + label map pair not found under {SHARED}")
    t1 = np.asarray(nib.load(REAL_T1).dataobj, dtype=np.float32)
    img = nib.load(REAL_LABELS)
    labels = np.asarray(img.dataobj).astype(np.int64)
    # aparc.a2009s cortex parcels (11101..11175 left, 12101..12175 right) are cortex; other labels > 255 unused
    labels = np.where((labels >= 11100) & (labels < 12000), 3, np.where(labels >= 12100, 42, labels))
    labels[labels > 255] = 0
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(labels))
    return t1[box], labels[box].astype(np.uint8), img.affine


def test_synthetic_contrast_matches_the_real_t1_of_the_same_label_map(real_pair: tuple) -> None:
    """Real FreeSurfer norm (white matter = 1): cortex 0.65, ventricles 0.23, thalamus 0.89, caudate 0.78,
    putamen 0.84, pallidum 0.96, hippocampus 0.69, cerebellar WM 0.86 / cortex 0.60, brainstem 0.84. The median over
    draws from the priors lands within 0.12 of each, ranks the groups alike, and every draw keeps the T1 order."""
    t1, labels, affine = real_pair
    real = _ratios(t1, labels)
    assert real["cortex"] == pytest.approx(0.65, abs=0.02) and real["lateral ventricles"] == pytest.approx(0.23,
                                                                                                          abs=0.02)
    prior = load_label_map(label_map_names()[0])
    source = LabelMap("fs-norm", labels, affine, prior.prior_means, prior.prior_stds, np.eye(4))
    draws = [_ratios(source.template(np.random.default_rng(seed)).image, labels) for seed in range(4)]
    synthetic = {name: float(np.median([d[name] for d in draws])) for name in GROUPS}
    for name in GROUPS:
        assert abs(synthetic[name] - real[name]) <= 0.12, (name, synthetic[name], real[name])
    names = [n for n in GROUPS if n != "white matter"]
    rho = spearmanr([real[n] for n in names], [synthetic[n] for n in names]).statistic
    assert rho >= 0.7, rho
    for d in draws:  # white matter > deep grey > cortex > ventricles in every draw
        assert 1.0 > d["thalamus"] > d["cortex"] > d["lateral ventricles"]
        assert d["cortex"] / d["lateral ventricles"] > 1.4


def test_packaged_label_maps_are_twenty_skull_stripped_brains() -> None:
    names = label_map_names()
    assert names == [f"synthseg_training_seg_{i:02d}" for i in range(1, 21)]
    assert PACKAGED_LABEL_MAPS.stat().st_size < 8_000_000
    source = load_label_map(names[4])
    assert source.labels.max() < 500 and set(np.unique(source.labels)) >= {0, 2, 3, 4, 41, 42, 43}
    brain_ml = float((source.labels > 0).sum()) * abs(np.linalg.det(source.affine[:3, :3])) / 1000
    assert 900 < brain_ml < 1900
    # RAS+: the left hemisphere's white matter (label 2) lies at lower world x than the right's (41)
    left, right = (source.affine[0, 0] * np.argwhere(source.labels == k)[:, 0].mean() for k in (2, 41))
    assert source.affine[0, 0] > 0 and left < right


def test_same_seed_same_brain_and_prior_means_without_a_seed() -> None:
    source = load_label_map("synthseg_training_seg_03")
    a = source.template(np.random.default_rng(5))
    b = source.template(np.random.default_rng(5))
    c = source.template(np.random.default_rng(6))
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    mean = source.template(None)
    wm = np.isin(source.labels, (2, 41)) & (np.stack(np.gradient(source.labels.astype(float))) == 0).all(0)
    assert np.median(mean.image[wm]) == pytest.approx(1.0, abs=0.01)
    assert mean.image[source.labels == 0].max() == 0 and (mean.brain > 0).sum() == (source.labels > 0).sum()
    assert mean.tissue[np.isin(source.labels, (4, 43))].max() == 0  # no strokes in the ventricles


def test_unknown_label_map_name_is_a_clear_error() -> None:
    from phanes_cli.errors import InputError

    with pytest.raises(InputError, match="no label map 'synthseg_nope'"):
        load_label_map("synthseg_nope")
