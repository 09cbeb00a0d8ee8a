"""The calibration domain (core.domain): healthy-tissue figures, their stored range, and the out-of-domain rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.domain import MARGIN, check_record, domain_record, healthy_tissue_figures, outside
from phanes_cli.errors import BundleError


def test_figures_leave_out_the_lesion_and_its_border() -> None:
    rng = np.random.default_rng(0)
    brain = np.zeros((12, 12, 12), dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    anomaly = np.where(rng.random(brain.shape) < 0.2, rng.random(brain.shape), 0.0).astype(np.float32) * brain
    lesions = np.zeros_like(brain)
    lesions[5:7, 5:7, 5:7] = True
    anomaly[4:8, 4:8, 4:8] = 5.0  # the lesion and its one-voxel border score high: never healthy tissue
    got = healthy_tissue_figures(anomaly, brain, lesions)
    border = np.zeros_like(brain)
    border[4:8, 4:8, 4:8] = True  # the 26-neighbour dilation of the 2x2x2 lesion, by hand
    healthy = brain & ~border
    positive = anomaly[healthy][anomaly[healthy] > 0]
    assert got["inpainted_fraction"] == pytest.approx(positive.size / healthy.sum())
    assert got["score_median"] == pytest.approx(float(np.median(positive)))
    assert got["score_median"] < 1.0  # the lesion's 5.0 stayed out
    empty = healthy_tissue_figures(np.zeros(brain.shape, np.float32), brain, np.zeros_like(brain))
    assert empty == {"inpainted_fraction": 0.0, "score_median": 0.0}


def test_range_margin_and_both_directions() -> None:
    record = domain_record([{"inpainted_fraction": 0.02, "score_median": 0.1},
                            {"inpainted_fraction": 0.04, "score_median": 0.3}])
    assert record == {"inpainted_fraction": [0.02, 0.04], "score_median": [0.1, 0.3], "margin": MARGIN,
                      "n_volumes": 2}
    assert check_record(record) is None
    assert outside({"inpainted_fraction": 0.04 * MARGIN, "score_median": 0.1 / MARGIN}, record) == []
    assert outside({"inpainted_fraction": 0.04 * MARGIN * 1.01, "score_median": 0.2}, record) == ["inpainted_fraction"]
    assert outside({"inpainted_fraction": 0.03, "score_median": 0.1 / MARGIN / 1.01}, record) == ["score_median"]


@pytest.mark.parametrize(("domain", "message"), [
    ([1], "must be a JSON object"),
    ({"inpainted_fraction": [0, 1], "score_median": [0, 1], "margin": 1.5, "other": 1}, "unknown key"),
    ({"inpainted_fraction": [0.5, 0.1], "score_median": [0, 1], "margin": 1.5}, "inpainted_fraction must be"),
    ({"inpainted_fraction": [0, 1], "score_median": [0, math.nan], "margin": 1.5}, "score_median must be"),
    ({"inpainted_fraction": [0, 1], "score_median": [0, 1]}, "margin must be"),
    ({"inpainted_fraction": [0, 1], "score_median": [0, 1], "margin": 0.5}, "margin must be"),
    ({"inpainted_fraction": [0, 1], "score_median": [0, 1], "margin": 1.5, "n_volumes": -1}, "n_volumes must be"),
])
def test_a_bad_stored_domain_is_a_bundle_error_naming_it(domain: object, message: str) -> None:
    with pytest.raises(BundleError, match=f"run.json: calibration domain {message}"):
        Calibration.from_dict({"mask_threshold": 0.3, "anomaly_threshold": 0.1, "domain": domain}, "run.json")


def test_calibration_round_trip_keeps_the_domain() -> None:
    domain = domain_record([{"inpainted_fraction": 0.02, "score_median": 0.1}])
    cal = Calibration(0.3, 0.07, n_slices=4, n_volumes=1, domain=domain)
    assert cal.to_dict()["domain"] == domain
    assert Calibration.from_dict(cal.to_dict(), "x") == cal
    assert "domain" not in Calibration(0.3, 0.07).to_dict()  # older records stay as they were
