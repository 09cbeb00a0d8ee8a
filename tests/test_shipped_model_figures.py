"""The model shipped with phanes (data/models/): its files are the ones recorded, it says where it came from, and
it reproduces the validation figures recorded in its calibration on its own validation volumes.

The validation volumes are rebuilt exactly as the training cohort held them (`data synth` with the recipe stored in
provenance.json, only the val split), the tuning's real lesion shapes are inserted again with its seed, and the
pipeline runs with the bundle's calibration: lesion Dice pooled over those volumes and each volume's burden error
must match calibration.json (to float noise across machines and thread counts). Test brains are never read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from phanes_cli.calibrate.insertion import lesioned_validation
from phanes_cli.calibrate.tune import burden_errors, validation_figures
from phanes_cli.core.bundle import PROVENANCE_FILE, load_bundle
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.shipped_models import models_dir, shipped_bundles
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.synth.cohort import synth_cohort
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from phanes_cli.training.data import healthy_rows


@pytest.fixture(scope="module")
def shipped() -> Path:
    bundles = shipped_bundles()
    assert bundles, f"no model bundle in {models_dir()}: phanes ships one (README: The model shipped and its limits)"
    return bundles[0]


def _provenance(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / PROVENANCE_FILE).read_text())


def test_the_shipped_model_verifies_and_says_where_it_came_from(shipped: Path) -> None:
    model = load_bundle(shipped)  # every file against its recorded sha256
    provenance = _provenance(shipped)
    recipe = provenance["cohort"]["synth"]
    assert set(recipe) >= {"healthy", "lesions", "seed", "label_map_fraction", "val_sources", "test_sources"}
    assert provenance["source"]["commit"] and provenance["training"]["seconds"] > 0
    tuning = model.require_calibration().tuning
    assert tuning is not None and tuning["validation"]["dice"] > 0
    assert {"median_fp_ml", "median_fp_components"} <= set(tuning["healthy_validation"])
    test_sources = set(recipe["test_sources"])
    assert not test_sources & set(provenance["cohort"]["train"]["sources"])
    assert not test_sources & set(provenance["cohort"]["val"]["sources"])


@pytest.mark.slow  # about a minute on 2 cores: six validation volumes through the pipeline
def test_the_shipped_model_reproduces_its_validation_figures(shipped: Path, tmp_path: Path) -> None:
    model = load_bundle(shipped)
    calibration, cfg = model.require_calibration(), model.config
    recipe = _provenance(shipped)["cohort"]["synth"]
    manifest = synth_cohort(tmp_path / "val", recipe["healthy"], recipe["lesions"], seed=recipe["seed"],
                            label_map_fraction=recipe["label_map_fraction"],
                            val_sources=tuple(recipe["val_sources"]), test_sources=tuple(recipe["test_sources"]),
                            only_splits=("val",))
    rows = healthy_rows(manifest, "val")
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
