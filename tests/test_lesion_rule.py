"""The lesion rule and the calibration record, against oracles written out here with scipy and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.errors import BundleError, ConfigError

FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, the project's lesion connectivity
VOXEL_ML = 0.003375  # 1.5 mm voxels


def oracle_drop(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """scipy's components of a mask, each kept when it holds at least `min_ml` millilitres."""
    labels, n = ndimage.label(mask, structure=FULL)
    out = np.zeros_like(mask)
    for k in range(1, n + 1):
        if (labels == k).sum() * voxel_ml >= min_ml:
            out |= labels == k
    return out


def _oracle(score: np.ndarray, brain: np.ndarray, threshold: float, min_ml: float, voxel_ml: float) -> np.ndarray:
    """The rule spelled out voxel by voxel and component by component."""
    candidates = np.zeros(score.shape, dtype=bool)
    for index in np.ndindex(score.shape):
        candidates[index] = bool(brain[index]) and score[index] > 0 and score[index] >= threshold
    return oracle_drop(candidates, min_ml, voxel_ml)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    score = np.clip(ndimage.gaussian_filter(rng.normal(size=(18, 20, 16)), 1.5), 0, None).astype(np.float32)
    score[score < 0.05] = 0  # s(x) is exactly 0 outside the inpainting mask
    brain = np.zeros(score.shape, dtype=bool)
    brain[2:-2, 1:-3, 2:-1] = True
    return score, brain


@pytest.mark.parametrize(("threshold", "min_ml"), [(0.1, 0.0), (0.1, 0.02), (0.2, 0.05), (0.0, 0.0), (0.0, 0.1)])
def test_apply_matches_the_oracle(volume: tuple[np.ndarray, np.ndarray], threshold: float, min_ml: float) -> None:
    score, brain = volume
    got = LesionRule(threshold, min_ml).apply(score, brain, VOXEL_ML)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, _oracle(score, brain, threshold, min_ml, VOXEL_ML))


def test_the_threshold_is_inclusive_and_zero_is_never_a_lesion() -> None:
    score = np.array([0.0, 0.09999, 0.1, 0.3], dtype=np.float32)
    brain = np.array([True, True, True, False])
    np.testing.assert_array_equal(LesionRule(0.1).candidates(score, brain), [False, False, True, False])
    np.testing.assert_array_equal(LesionRule(0.0).candidates(score, brain), [False, True, True, False])


def test_the_minimum_size_keeps_components_at_exactly_the_size() -> None:
    score = np.zeros((9, 9, 9), dtype=np.float32)
    score[1:3, 1:3, 1:3] = 1.0  # 8 voxels
    score[6, 6, 6] = 1.0  # 1 voxel
    score[4, 4, 4] = 1.0  # touches nothing: a component of its own
    brain = np.ones(score.shape, dtype=bool)
    kept = LesionRule(0.5, min_ml=8 * 0.001).apply(score, brain, 0.001)
    assert int(kept.sum()) == 8 and kept[1:3, 1:3, 1:3].all()
    assert int(LesionRule(0.5, min_ml=8.0001 * 0.001).apply(score, brain, 0.001).sum()) == 0
    np.testing.assert_array_equal(LesionRule(0.5).keeps(np.array([0.0, 0.5])), [True, True])
    np.testing.assert_array_equal(LesionRule(0.5, 0.25).keeps(np.array([0.2, 0.25, 0.3])), [False, True, True])


def test_diagonal_neighbours_form_one_lesion() -> None:
    score = np.zeros((5, 5, 5), dtype=np.float32)
    score[1, 1, 1] = score[2, 2, 2] = 1.0  # corner contact: one 26-connected lesion of 2 voxels
    kept = LesionRule(0.5, min_ml=0.002).apply(score, np.ones(score.shape, bool), 0.001)
    assert int(kept.sum()) == 2


def test_rule_from_a_calibration() -> None:
    rule = LesionRule.from_calibration(Calibration(mask_threshold=0.3, anomaly_threshold=0.07, min_lesion_ml=1.5))
    assert rule == LesionRule(threshold=0.07, min_ml=1.5)


def test_calibration_round_trip_and_overrides() -> None:
    cal = Calibration(0.3, 0.07, n_slices=12, n_volumes=2, min_lesion_ml=1.5, tuning={"mask_percentile": 80.0})
    assert Calibration.from_dict(cal.to_dict(), "x") == cal
    plain = Calibration(0.3, 0.07)
    assert plain.to_dict() == {"mask_threshold": 0.3, "anomaly_threshold": 0.07, "n_slices": 0, "n_volumes": 0,
                               "min_lesion_ml": 0.0, "tuning": None}  # every field: readers fill nothing in
    assert Calibration.from_dict(plain.to_dict(), "x") == plain
    changed = cal.with_lesion_rule(anomaly_threshold=0.2)
    assert (changed.anomaly_threshold, changed.min_lesion_ml, changed.mask_threshold) == (0.2, 1.5, 0.3)
    assert cal.with_lesion_rule(min_lesion_ml=0.0).min_lesion_ml == 0.0
    assert cal.with_lesion_rule() == cal
    assert cal.columns() == {"mask_threshold": 0.3, "anomaly_threshold": 0.07, "min_lesion_ml": 1.5}
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="finite number >= 0"):
            cal.with_lesion_rule(min_lesion_ml=bad)


def test_a_stored_calibration_domain_record_is_read_and_ignored() -> None:
    """calibration.json files written with the retired calibration-domain record (a shipped bundle's among them)
    still load, to the same operating point."""
    stored = {"mask_threshold": 0.3, "anomaly_threshold": 0.07, "min_lesion_ml": 2.0,
              "domain": {"inpainted_fraction": [0.38, 0.57], "score_median": [0.006, 0.035], "margin": 1.5}}
    assert Calibration.from_dict(stored, "calibration.json") == Calibration(0.3, 0.07, min_lesion_ml=2.0)


@pytest.mark.parametrize(("values", "message"), [
    ([1, 2], "must be a JSON object"),
    ({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "extra": 1}, "unknown calibration key"),
    ({"mask_threshold": 0.3}, "anomaly_threshold must be a finite number above 0"),
    ({"mask_threshold": 0.0, "anomaly_threshold": 0.1}, "mask_threshold must be"),
    ({"mask_threshold": True, "anomaly_threshold": 0.1}, "mask_threshold must be"),
    ({"mask_threshold": 0.3, "anomaly_threshold": math.inf}, "anomaly_threshold must be"),
    ({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "n_slices": -1}, "n_slices must be a whole number"),
    ({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "min_lesion_ml": False}, "min_lesion_ml must be"),
    ({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "min_lesion_ml": -0.5}, "min_lesion_ml must be"),
    ({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "tuning": [1]}, "tuning must be a JSON object"),
])
def test_from_dict_names_the_source_and_the_key(values: object, message: str) -> None:
    with pytest.raises(BundleError, match=f"run.json: .*{message}"):
        Calibration.from_dict(values, "run.json")
