"""`calibrate --tune`: lesions inserted into validation volumes only, Dice-optimal choice stored in the bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import phanes_cli.inputs.brain_masks
from phanes_cli.calibrate.insertion import LesionedVolume, insert_lesion, lesioned_validation
from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.calibrate.tune import dice_grid, healthy_fp, within_budget
from phanes_cli.config import TuneConfig
from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.volume_io import load_mask, load_volume
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.runtimes.pytorch import PhanesNetworks
from phanes_cli.runtimes.select import choose_backend
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152
from tests._tiny_cohort import tiny_config, write_cohort
from tests.test_lesion_rule import oracle_drop

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dice_grid_matches_a_numpy_oracle() -> None:
    rng = np.random.default_rng(1)
    volumes, scores = [], []
    for k in range(2):
        brain = np.zeros((24, 24, 24), dtype=bool)
        brain[2:-2, 2:-2, 2:-2] = True
        truth = (ndimage.gaussian_filter(rng.normal(size=brain.shape), 2.0) > 0.1) & brain
        score = np.clip(truth * 1.0 + rng.normal(0, 0.4, brain.shape), 0, None).astype(np.float32) * brain
        volumes.append(LesionedVolume(f"v{k}", score, brain, truth, 0.008, (2.0, 2.0, 2.0)))
        scores.append(score)
    thresholds, sizes = np.array([0.3, 0.6, 0.9]), [0.0, 0.02, 0.2]
    grid = dice_grid(scores, volumes, thresholds, sizes)
    for i, t in enumerate(thresholds):
        for j, m in enumerate(sizes):
            tp = pred = true = 0
            for s, v in zip(scores, volumes, strict=True):
                p = oracle_drop((s >= t) & (s > 0) & v.brain, m, v.voxel_ml)
                tp, pred, true = tp + (p & v.truth).sum(), pred + p.sum(), true + v.truth.sum()
            assert grid[i, j] == pytest.approx(2 * tp / (pred + true))


def test_healthy_false_positives_and_the_budgeted_choice_match_an_oracle() -> None:
    """healthy_fp counts what the lesion rule keeps on healthy volumes; within_budget picks the best Dice whose
    median healthy false positive volume is within the budget, else the least false positive volume."""
    rng = np.random.default_rng(3)
    volumes, scores = [], []
    for k in range(3):
        brain = np.zeros((20, 20, 20), dtype=bool)
        brain[2:-2, 2:-2, 2:-2] = True
        score = (ndimage.gaussian_filter(rng.normal(size=brain.shape), 1.5) * 4).clip(0, None).astype(np.float32)
        volumes.append(LesionedVolume(f"h{k}", score * brain, brain, np.zeros_like(brain), 0.008, (2.0, 2.0, 2.0)))
        scores.append(score * brain)
    thresholds, sizes = np.array([0.2, 0.5, 1.0]), [0.0, 0.02, 0.1]
    ml, count = healthy_fp(scores, volumes, thresholds, sizes)
    for v, (s, vol) in enumerate(zip(scores, volumes, strict=True)):
        for i, t in enumerate(thresholds):
            for j, m in enumerate(sizes):
                kept = oracle_drop((s >= t) & (s > 0) & vol.brain, m, vol.voxel_ml)
                assert ml[v, i, j] == pytest.approx(kept.sum() * vol.voxel_ml)
                assert count[v, i, j] == ndimage.label(kept, structure=np.ones((3, 3, 3), dtype=bool))[1]
    assert (np.diff(ml, axis=1) <= 1e-12).all() and (np.diff(ml, axis=2) <= 1e-12).all()  # monotone
    dice = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2], [0.3, 0.5, 0.4]])
    median = np.median(ml, axis=0)
    budget = float(np.sort(median.ravel())[4])  # five points are within it
    i, j, met = within_budget(dice, ml, budget)
    ok = [(dice[a, b], -a, -b) for a in range(3) for b in range(3) if median[a, b] <= budget]
    _, a, b = max(ok)
    assert met and (i, j) == (-a, -b)
    i, j, met = within_budget(dice, ml, -1.0)  # nothing within: the least false positive volume
    assert not met and median[i, j] == median.min()
    # a component budget as well: only points within both budgets are admissible
    components = np.median(count, axis=0)
    limit = float(np.sort(components.ravel())[3])
    both = [(dice[x, y], -x, -y) for x in range(3) for y in range(3)
            if median[x, y] <= budget and components[x, y] <= limit]
    i, j, met = within_budget(dice, ml, budget, count, limit)
    _, x, y = max(both)
    assert met and (i, j) == (-x, -y) != within_budget(dice, ml, budget)[:2]  # the component budget moved it
    assert within_budget(dice, ml, budget, count, float("inf")) == within_budget(dice, ml, budget)


def test_inserted_lesion_changes_only_its_blend_region(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, n_train=0, n_val=1)
    row = read_manifest(manifest)[0]
    volume = load_volume(row.image)
    assert row.brain_mask is not None
    brain = load_mask(row.brain_mask, volume)
    image, truth = insert_lesion(volume.data, brain, volume.affine, npz_bank(), load_mni152(), np.random.default_rng(4))
    assert truth.any() and (truth <= brain).all()
    changed = image != volume.data
    near = ndimage.distance_transform_edt(~truth) <= 2.0  # the soft border reaches at most 2 voxels out
    assert (changed <= near).all()
    assert image[truth].mean() < 0.8 * volume.data[truth].mean()  # a T1 hypo-intensity


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], str]:
    """A seeded tiny bundle tuned on a manifest whose test rows point at files that must never be read, and the
    plain progress lines the tuning wrote (stderr not a terminal, a line on every update)."""
    tmp_path = tmp_path_factory.mktemp("tuned")
    cfg = dataclasses.replace(tiny_config(), tune=TuneConfig(enabled=True, mask_percentiles=(90.0, 99.0),
                                                             min_lesion_ml=(0.0, 0.5), anomaly_candidates=8, copies=1))
    torch.manual_seed(0)
    nets = PhanesNetworks(cfg)
    save_bundle(tmp_path / "bundle", cfg, nets.ra, nets.generator)
    rows = read_manifest(write_cohort(tmp_path / "data", n_train=1, n_val=2))
    test_rows = [ManifestRow(id=f"t{k}", image=tmp_path / f"test{k}.nii.gz", brain_mask=tmp_path / f"t{k}_brain.nii.gz",
                             split="test", kind=kind) for k, kind in enumerate(("healthy", "stroke"))]
    for r in test_rows:  # present but not NIfTI: reading one would fail loudly, besides being recorded below
        r.image.write_text("test data")
    manifest = write_manifest(rows + test_rows, tmp_path / "mixed.parquet")
    reads: list[str] = []
    real = phanes_cli.inputs.brain_masks.load_volume

    def recording(path: object, *args: object, **kwargs: object) -> object:
        reads.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(log):
            patch.setattr(phanes_cli.inputs.brain_masks, "load_volume", recording)
            patch.setenv("PHANES_PROGRESS_SECONDS", "0")
            calibrate(CalibrateOptions(manifest=manifest, bundle=tmp_path / "bundle", device="cpu", batch_size=16,
                                       progress=True))
    finally:
        torch.set_num_threads(threads)
    return tmp_path / "bundle", manifest, reads, log.getvalue()


def test_tune_reads_validation_only_and_stores_its_choice(tuned: tuple[Path, Path, list[str], str]) -> None:
    bundle, manifest, reads, _ = tuned
    rows = read_manifest(manifest)
    val = {str(r.image) for r in rows if r.split == "val"}
    assert reads and set(reads) <= val, reads  # never a test (or train) row
    model = load_bundle(bundle)
    cal = model.calibration
    assert cal is not None and cal.tuning is not None
    assert cal.tuning["mask_percentile"] in (90.0, 99.0) and cal.min_lesion_ml in (0.0, 0.5)
    assert model.config.mask.mask_percentile == cal.tuning["mask_percentile"]  # the choice is in the bundle config
    stored = json.loads((bundle / "calibration.json").read_text())
    assert stored["tuning"]["validation"]["volumes"] == 2 and stored["min_lesion_ml"] == cal.min_lesion_ml
    within = [d for d in cal.tuning["dice_by_mask_percentile"].values() if d is not None]
    if cal.tuning["budget_met"]:
        assert cal.tuning["validation"]["dice"] == pytest.approx(max(within))
    clean = stored["tuning"]["healthy_validation"]
    assert clean["volumes"] == [r.id for r in rows if r.split == "val"] and len(clean["fp_ml"]) == 2
    assert stored["tuning"]["healthy_fp_budget_ml"] == model.config.tune.healthy_fp_budget_ml
    assert stored["tuning"]["healthy_fp_budget_components"] == model.config.tune.healthy_fp_budget_components == 1
    within_both = (clean["median_fp_ml"] <= stored["tuning"]["healthy_fp_budget_ml"]
                   and float(np.median(clean["fp_components"])) <= stored["tuning"]["healthy_fp_budget_components"])
    assert within_both == cal.tuning["budget_met"]
    assert clean["median_fp_components"] == float(np.median(clean["fp_components"]))


def test_tuned_validation_dice_matches_an_independent_recount(tuned: tuple[Path, Path, list[str], str]) -> None:
    """Re-insert the same seeded lesions, run the stored operating point, count Dice with scipy/numpy."""
    bundle, manifest, _, _ = tuned
    model = load_bundle(bundle)
    cal = model.calibration
    assert cal is not None and cal.tuning is not None
    val_rows = [r for r in read_manifest(manifest) if r.split == "val"]
    lesioned = lesioned_validation(val_rows, npz_bank(), load_mni152(), copies=1, seed=model.config.tune.seed,
                                   shapes=model.config.tune.shapes_per_volume)
    backend = choose_backend("auto", model, torch.device("cpu"))  # the backend calibrate runs on
    tp = pred = true = 0
    burden: list[float] = []
    for v in lesioned:
        s = run_volume(v.image, v.brain, v.zooms, backend, model.config, cal.mask_threshold, 16, keep=()).anomaly
        p = oracle_drop((s >= cal.anomaly_threshold) & (s > 0) & v.brain, cal.min_lesion_ml, v.voxel_ml)
        tp, pred, true = tp + (p & v.truth).sum(), pred + p.sum(), true + v.truth.sum()
        burden.append((float(p.sum()) - float(v.truth.sum())) * v.voxel_ml)
    assert cal.tuning["validation"]["dice"] == pytest.approx(2 * tp / max(pred + true, 1), abs=1e-6)
    assert cal.tuning["validation"]["burden_error_ml"] == pytest.approx(burden, abs=1e-9)
    # the healthy validation volumes, untouched, at the stored operating point
    fp = []
    for row in val_rows:
        volume = load_volume(row.image)
        brain = load_mask(row.brain_mask, volume)
        s = run_volume(volume.data, brain, volume.zooms, backend, model.config, cal.mask_threshold, 16, keep=()).anomaly
        kept = oracle_drop((s >= cal.anomaly_threshold) & (s > 0) & brain, cal.min_lesion_ml, volume.voxel_ml)
        fp.append(kept.sum() * volume.voxel_ml)
    assert cal.tuning["healthy_validation"]["fp_ml"] == pytest.approx(fp, abs=1e-9)


def test_tune_refuses_test_split_and_percentile_overrides(tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny_config(), tune=TuneConfig(enabled=True))
    nets = PhanesNetworks(cfg)
    save_bundle(tmp_path / "bundle", cfg, nets.ra, nets.generator)
    manifest = write_cohort(tmp_path / "data", n_train=1, n_val=1)
    with pytest.raises(ConfigError, match="'test' split"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=tmp_path / "bundle", device="cpu", split="test",
                                   progress=False))
    with pytest.raises(ConfigError, match="--tune chooses"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=tmp_path / "bundle", device="cpu", mask_percentile=95.0,
                                   progress=False))


def test_cli_tune_conflicts_and_bad_lesion_source_are_one_line_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from phanes_cli.cli import app

    cfg = dataclasses.replace(tiny_config(), tune=TuneConfig(enabled=False))
    nets = PhanesNetworks(cfg)
    save_bundle(tmp_path / "bundle", cfg, nets.ra, nets.generator)
    manifest = write_cohort(tmp_path / "data", n_train=1, n_val=1)
    runner = CliRunner()
    run = runner.invoke(app, ["calibrate", "--bundle", str(tmp_path / "bundle"), "--data", str(manifest), "--tune",
                              "--mask-percentile", "95"])
    assert run.exit_code == 2 and "--tune chooses" in run.output and "Traceback" not in run.output
    run = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--lesion-source", "drawn"])
    assert run.exit_code == 2 and "'drawn' is not one of 'real', 'procedural'" in run.output  # a Click choice
    assert not (tmp_path / "s").exists()


def test_tuning_progress_counts_mask_percentiles_and_says_what_each_gave(
        tuned: tuple[Path, Path, list[str], str]) -> None:
    """In a log file the tuning step reads k/2 (two mask percentiles here), each line with that percentile's Dice,
    the recorded one, and whether its point met the budgets."""
    bundle, _, _, log = tuned
    tuning = load_bundle(bundle).require_calibration().tuning
    assert tuning is not None
    lines = [line for line in log.splitlines() if line.startswith("tuning on validation lesions: ")]
    counts = [line.split(": ", 1)[1].split(",")[0] for line in lines]
    assert counts[-1] == "2/2" and "1/2" in counts, lines
    for q, dice in tuning["dice_by_mask_percentile"].items():
        said = next(line for line in lines if f"mask percentile {q}: " in line)
        assert ("within the budgets" in said) == (dice is not None), said
        if dice is not None:
            assert f"Dice {dice:.3f}," in said
