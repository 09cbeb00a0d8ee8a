"""The model shipped with phanes (data/models/): its files are the ones recorded, it says where it came from, and
it reproduces the validation figures recorded in its calibration on its own validation volumes.

The validation rows are rebuilt exactly as the training manifest held them (`tools/real_cohort.py` with the recipe
stored in provenance.json, on the real brains of ../shared/data; skipped without them), the tuning's real lesion
shapes are inserted again with its seed, and the pipeline runs with the bundle's calibration: lesion Dice pooled over
those volumes and each volume's burden error must match calibration.json (to float noise across machines and thread
counts). Test brains are never read.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from phanes_cli.calibrate.insertion import lesioned_validation
from phanes_cli.calibrate.tune import burden_errors, validation_figures
from phanes_cli.core.bundle import PROVENANCE_FILE, load_bundle
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.shipped_models import models_dir, shipped_bundles
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from tests.conftest import SHARED_DATA

REAL_COHORT = Path(__file__).resolve().parents[1] / "tools" / "real_cohort.py"
needs_cohort = pytest.mark.skipif(not (SHARED_DATA / "ixi").is_dir() or not (SHARED_DATA / "ds002748").is_dir(),
                                  reason="../shared/data/ixi and ds002748 (the training population) are not here")


@pytest.fixture(scope="module")
def shipped() -> Path:
    bundles = shipped_bundles()
    assert bundles, f"no model bundle in {models_dir()}: phanes ships one (README: The model shipped and its limits)"
    return bundles[0]


def _provenance(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / PROVENANCE_FILE).read_text())


def _real_cohort() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_cohort", REAL_COHORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_model_verifies_and_says_where_it_came_from(shipped: Path) -> None:
    model = load_bundle(shipped)  # every file against its recorded sha256
    provenance = _provenance(shipped)
    cohort = provenance["cohort"]
    assert set(cohort["recipe"]) >= {"tool", "val_per_site", "test_ixi", "test_ds", "seed"}
    assert provenance["source"]["commit"] and provenance["training"]["seconds"] > 0
    tuning = model.require_calibration().tuning
    assert tuning is not None and tuning["validation"]["dice"] > 0
    assert {"median_fp_ml", "median_fp_components"} <= set(tuning["healthy_validation"])
    train, val, test = (set(cohort[split]["sources"]) for split in ("train", "val", "test"))
    assert len(val) >= 2  # validation spans at least two sites
    assert test - train - val  # and at least one test site is held out of both


@needs_cohort
@pytest.mark.slow  # about a minute on 2 cores: twelve validation volumes through the pipeline
def test_the_shipped_model_reproduces_its_validation_figures(shipped: Path) -> None:
    model = load_bundle(shipped)
    calibration, cfg = model.require_calibration(), model.config
    recipe = _provenance(shipped)["cohort"]["recipe"]
    rows = [r for r in _real_cohort().cohort_rows(SHARED_DATA, recipe["val_per_site"], recipe["test_ixi"],
                                                    recipe["test_ds"], recipe["seed"]) if r.split == "val"]
    lesioned = lesioned_validation(rows, npz_bank(), load_mni152(), cfg.tune.copies, cfg.tune.seed, "auto",
                                   cfg.tune.shapes_per_volume)
    tuning = calibration.tuning
    assert tuning is not None and [v.id for v in lesioned] == tuning["lesioned_volumes"]
    backend = TorchBackend(load_networks(model), torch.device("cpu"))
    scores = [run_volume(v.image, v.brain, v.zooms, backend, cfg, calibration.mask_threshold, keep=()).anomaly
              for v in lesioned]
    figures = validation_figures(scores, lesioned, calibration.anomaly_threshold, calibration.min_lesion_ml)
    assert figures["dice"] == pytest.approx(tuning["validation"]["dice"], abs=0.01)
    errors = burden_errors(scores, lesioned, calibration.anomaly_threshold, calibration.min_lesion_ml)
    assert errors == pytest.approx(tuning["validation"]["burden_error_ml"], abs=0.5)
