"""`phanes evaluate`: real-lesion scoring over a manifest split and the synthetic sprite protocol.

Networks are tiny and untrained: these tests check the mechanics (alignment of maps and truth,
method wiring, outputs, determinism), not accuracy. Where a figure must be high, a stand-in stage 1
with a known answer (reconstruct = healthy tissue level) makes it so.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from rich.table import Table
from sklearn.metrics import average_precision_score

from phanes_cli.config import AOTConfig, PhanesConfig, PreprocessConfig, RAConfig
from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.preprocess import prepare_volume, slices_of
from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS, load_mask, load_volume
from phanes_cli.errors import ConfigError, InputError
from phanes_cli.evaluation.evaluate import evaluate, evaluate_volume, render_tables
from phanes_cli.evaluation.methods import predict, run_methods, validate_methods
from phanes_cli.evaluation.options import EvaluateOptions
from phanes_cli.evaluation.synthetic import central_positions, mid_slices, run_synthetic, synthetic_subjects
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.models import AOTGenerator, SoftIntroVAE
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.screening.actors import InferenceActor
from phanes_cli.screening.tasks import WriteJob, decode_volume, write_volume

SHAPE = (40, 48, 20)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
TISSUE = 100.0
CALIBRATION = Calibration(mask_threshold=0.05, anomaly_threshold=0.02)
ALL_METHODS = ("phanes", "ra", "phanes-gt", "residual")


def _tiny_config() -> PhanesConfig:
    return PhanesConfig(
        name="tiny-test",
        ra=RAConfig(channels=(4, 4, 8, 8, 8), latent_dim=8),
        aot=AOTConfig(base_channels=4, channels=8, blocks=1, rates=(1, 2)),
        preprocess=PreprocessConfig(image_size=32, field_mm=96.0),  # the 96 mm test volumes fill the grid
    )


def _brain(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat tissue with mild noise inside an ellipsoid: (image, brain)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    brain = r < 1.0
    image = (TISSUE + rng.normal(0, 2.0, SHAPE)) * brain
    return image.astype(np.float32), brain


def _ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    idx = np.indices(SHAPE)
    return ((idx - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), AFFINE), str(path))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle of untrained tiny networks and a manifest: 2 labelled test volumes with dark lesions,
    1 healthy test volume without a lesion mask, 1 healthy val volume."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    cfg = _tiny_config()
    bundle = root / "bundle"
    save_bundle(bundle, cfg, SoftIntroVAE(cfg.ra, cfg.preprocess.image_size), AOTGenerator(cfg.aot), CALIBRATION)
    lesions = {
        "p1": _ball((20, 20, 10), 4.5),
        "p2": _ball((14, 30, 8), 3.5) | _ball((27, 22, 12), 3.0),
    }
    rows = []
    for i, (name, lesion) in enumerate(lesions.items()):
        image, brain = _brain(i)
        image[lesion & brain] = 0.2 * TISSUE
        rows.append(ManifestRow(id=name, image=_save(root / f"{name}.nii.gz", image),
                                brain_mask=_save(root / f"{name}_brain.nii.gz", brain),
                                lesion_mask=_save(root / f"{name}_lesion.nii.gz", lesion & brain), split="test",
                                kind="stroke"))
    for name, split in (("h1", "test"), ("h2", "val")):
        image, brain = _brain(10 + len(rows))
        rows.append(ManifestRow(id=name, image=_save(root / f"{name}.nii.gz", image),
                                brain_mask=_save(root / f"{name}_brain.nii.gz", brain), split=split, kind="healthy"))
    manifest = write_manifest(rows, root / "manifest.parquet")
    return {"root": root, "bundle": bundle, "manifest": manifest}


@pytest.fixture(scope="module")
def result(cohort: dict[str, Path]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], cohort["root"] / "out",
                                          methods=ALL_METHODS, device="cpu", batch_size=16, synthetic_slices=4,
                                          progress=False))
    assert not [w for w in caught if "skipped" in str(w.message)]  # h1 is a healthy control, not skipped
    return result


@pytest.fixture(scope="module")
def model(cohort: dict[str, Path]) -> tuple[TorchBackend, PhanesConfig]:
    """The bundle's networks on the CPU, loaded once (the LPIPS trunk takes seconds)."""
    loaded = load_bundle(cohort["bundle"])
    return TorchBackend(load_networks(loaded), torch.device("cpu")), loaded.config


def test_outputs_have_a_row_per_method_and_volume(result, cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert list(result.summary["methods"]) == list(ALL_METHODS)
    assert set(summary["methods"]) == set(ALL_METHODS)
    assert summary["settings"]["n_volumes"] == 2
    assert summary["settings"]["healthy_controls"] == ["h1"]  # a healthy test row without mask: a control
    assert summary["settings"]["skipped_without_lesion_mask"] == []
    controls = pq.read_table(out / "healthy_controls.parquet").to_pylist()
    assert sorted((r["method"], r["id"]) for r in controls) == [("phanes", "h1"), ("phanes-gt", "h1"), ("ra", "h1")]
    assert summary["methods"]["residual"]["healthy_controls"] is None  # no threshold, no false positives to count
    assert summary["settings"]["bundle_hash"] == load_bundle(cohort["bundle"]).hash
    table = pq.read_table(out / "per_volume.parquet").to_pandas()
    assert len(table) == len(ALL_METHODS) * 2
    pairs = sorted(zip(table["method"], table["id"], strict=True))
    assert pairs == sorted((m, v) for m in ALL_METHODS for v in ("p1", "p2"))
    assert (table["slices_processed"] > 0).all()
    # p2 has two separate lesions; lesion counts come from the ground truth, the same for every method.
    assert set(table.loc[table["id"] == "p2", "lesions_gt"]) == {2}
    # The residual baseline has no calibrated threshold: its thresholded figures are blank, not fake zeros.
    residual = table[table["method"] == "residual"]
    assert residual["dice"].isna().all() and residual["abs_volume_error_ml"].isna().all()
    assert summary["methods"]["residual"]["dice"] is None and summary["methods"]["phanes"]["dice"] is not None
    for method in ALL_METHODS:
        assert 0.0 <= summary["methods"][method]["auprc"] <= 1.0
    assert json.loads((out / "synthetic.json").read_text()) == summary["synthetic"]
    assert pq.read_table(out / "synthetic.parquet").num_rows == len(ALL_METHODS) * 4


def test_render_tables_one_row_per_method(result) -> None:
    tables = render_tables(result)
    assert len(tables) == 3 and all(isinstance(t, Table) for t in tables)  # real, controls + size bins, synthetic
    assert [t.row_count for t in tables] == [len(ALL_METHODS)] * 3
    assert tables[0].columns[0]._cells == ["PHANES", "RA", "PHANES-GT", "Residual"]


def test_per_volume_figures_match_sklearn_on_the_native_maps(result, cohort: dict[str, Path], model) -> None:
    """Recompute AUPRC and Dice per volume from the native maps with independent code."""
    backend, cfg = model
    table = result.per_volume.to_pandas()
    for row in read_manifest(cohort["manifest"]):
        if row.lesion_mask is None:
            continue
        maps = evaluate_volume(row, backend, cfg, CALIBRATION, ("ra", "residual"), batch_size=8)
        truth = load_mask(row.lesion_mask, load_volume(row.image))
        region = maps.region
        for method in ("ra", "residual"):
            expected = average_precision_score(truth[region], maps.scores[method][region])
            got = table[(table["method"] == method) & (table["id"] == row.id)]["auprc"].item()
            assert got == pytest.approx(expected, abs=2e-3)
        pred = (maps.scores["ra"] > CALIBRATION.mask_threshold) & region
        t = truth & region
        expected_dice = 2 * (pred & t).sum() / (pred.sum() + t.sum())
        got = table[(table["method"] == "ra") & (table["id"] == row.id)]["dice"].item()
        assert got == pytest.approx(expected_dice, abs=1e-12)
        true_ml = table[(table["method"] == "ra") & (table["id"] == row.id)]["true_ml"].item()
        assert true_ml == pytest.approx(t.sum() * 0.008)


def test_screening_and_evaluation_give_the_maps_of_run_volume(cohort: dict[str, Path], model, tmp_path: Path) -> None:
    """One volume through screening's stages (decode task, inference actor, write task, files on disk) and
    through `evaluate_volume` gives the maps of `pipeline.run_volume`, whatever the batch size."""
    backend, cfg = model
    row = next(r for r in read_manifest(cohort["manifest"]) if r.id == "p1")
    volume = load_volume(row.image)
    brain = load_mask(row.brain_mask, volume)
    reference = run_volume(volume.data, brain, volume.zooms, backend, cfg, CALIBRATION.mask_threshold, batch_size=8)
    lesions = LesionRule.from_calibration(CALIBRATION).apply(reference.anomaly, brain, volume.voxel_ml)
    assert reference.anomaly.max() > 0 and reference.inpaint_mask is not None and reference.inpaint_mask.any()
    # Pseudo-healthy at the input's intensities: the input itself outside the inpainted mask, and inside it
    # x_ph in [0, 1] times the brain's 98th intensity percentile (not the model's [0, 1] scale).
    inside = reference.inpaint_mask
    np.testing.assert_array_equal(reference.pseudo_healthy[~inside], volume.data[~inside])
    scale = np.percentile(volume.data[brain & (volume.data > 0)], 98)
    assert 1.0 < reference.pseudo_healthy[inside].max() <= scale * (1 + 1e-5)

    threads = torch.get_num_threads()  # the screening stages set their own; later tests compare across batch sizes
    try:
        decoded, slices, context = decode_volume(row, cfg.preprocess, DEFAULT_MAX_VOXELS, "auto")
        bundle_hash = load_bundle(cohort["bundle"]).hash
        actor = InferenceActor(str(cohort["bundle"]), bundle_hash, "torch", "cpu", threads, 16, True, None)
        inferred, maps = actor.infer(slices)
        outputs = frozenset({"anomaly", "lesion_mask", "pseudohealthy"})
        job = WriteJob(row=row, out=tmp_path, outputs=outputs, calibration=CALIBRATION, backend="torch",
                       bundle_hash=bundle_hash)
        assert write_volume(job, decoded, inferred, context, maps).failure is None
    finally:
        torch.set_num_threads(threads)
    written = {k: np.asarray(nib.load(str(OutputLayout(tmp_path).map_path(row.id, k))).dataobj) for k in outputs}
    np.testing.assert_allclose(written["anomaly"], reference.anomaly, atol=1e-6)
    np.testing.assert_array_equal(written["lesion_mask"] > 0, lesions)
    np.testing.assert_allclose(written["pseudohealthy"], reference.pseudo_healthy, rtol=1e-5, atol=1e-4)

    evaluated = evaluate_volume(row, backend, cfg, CALIBRATION, ("phanes", "ra"), batch_size=16)
    np.testing.assert_allclose(evaluated.scores["phanes"], reference.anomaly, atol=1e-6)
    np.testing.assert_allclose(evaluated.scores["ra"], reference.stage1_map, atol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_array_equal(evaluated.inpaint_masks["phanes"], reference.inpaint_mask)
    predicted = predict("phanes", evaluated.scores["phanes"], brain, CALIBRATION, volume.voxel_ml)
    np.testing.assert_array_equal(predicted, lesions)


def test_phanes_gt_inpaints_the_ground_truth(result, cohort: dict[str, Path], model) -> None:
    backend, cfg = model
    row = next(r for r in read_manifest(cohort["manifest"]) if r.id == "p2")
    volume = load_volume(row.image)
    brain = load_mask(row.brain_mask, volume)
    truth = load_mask(row.lesion_mask, volume)
    prepared = prepare_volume(volume.data, brain, cfg.preprocess, volume.zooms)
    gt = (slices_of(truth, prepared.geometry) >= 0.5).float()
    assert gt.sum() > 0
    maps = run_methods(prepared.slices, prepared.brain, gt, backend, cfg, CALIBRATION, ("phanes", "phanes-gt"),
                       batch_size=4)
    assert maps.phanes is not None and maps.phanes_gt is not None
    np.testing.assert_array_equal(maps.phanes_gt.inpaint_mask, (gt * prepared.brain).numpy() > 0.5)
    assert not np.array_equal(maps.phanes.inpaint_mask, maps.phanes_gt.inpaint_mask)  # type: ignore[arg-type]
    # s(x) vanishes outside the inpainted mask, so the upper bound ranks the lesion first.
    assert (maps.phanes_gt.anomaly[gt.numpy() == 0] == 0).all()
    assert result.summary["methods"]["phanes-gt"]["auprc"] > 0.9
    assert result.summary["synthetic"]["methods"]["phanes-gt"]["auprc"] > 0.99


def test_synthetic_protocol_figures(result, cohort: dict[str, Path]) -> None:
    synthetic = result.summary["synthetic"]
    assert synthetic["settings"]["source_split"] == "test"
    assert synthetic["settings"]["subjects"] == ["h1"]  # healthy rows of the test split only
    assert synthetic["settings"]["n_slices"] == 4
    for method in ALL_METHODS:
        figures = synthetic["methods"][method]
        for key in ("lpips_anomaly", "lpips_healthy"):
            assert np.isfinite(figures[key]) and figures[key] >= 0
    # With the true mask, the generator only changes anomaly pixels: LPIPS is lower outside them.
    gt = synthetic["methods"]["phanes-gt"]
    assert gt["lpips_anomaly"] > gt["lpips_healthy"]
    per_slice = result.synthetic.per_slice.to_pandas()
    assert (per_slice["anomaly_pixels"] > 0).all()


def test_synthetic_slices_come_from_the_central_third(cohort: dict[str, Path]) -> None:
    assert central_positions(9, 1) == [4]
    assert central_positions(30, 3) == [10, 14, 20] or central_positions(30, 3) == [10, 15, 20]
    assert central_positions(0, 3) == []
    assert central_positions(3, 10) == [0, 1, 2]  # distinct indices only
    cfg = _tiny_config()
    rows = [r for r in read_manifest(cohort["manifest"]) if r.kind == "healthy"]
    slices = mid_slices(rows, cfg, 4)
    assert slices.x.shape == (4, 1, 32, 32) and slices.ids == ["h1", "h1", "h2", "h2"]
    volume = load_volume(rows[0].image)
    prepared = prepare_volume(volume.data, load_mask(rows[0].brain_mask, volume), cfg.preprocess, volume.zooms)
    picks = central_positions(prepared.geometry.n_slices, 2)
    assert slices.slice_index[:2] == [round(float(prepared.geometry.positions[p])) for p in picks]
    torch.testing.assert_close(slices.x[:2], prepared.slices[picks])


def test_residual_ranks_a_dark_lesion_first(cohort: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage 1 that reconstructs the healthy tissue level: the residual is large exactly at the lesion."""

    def healthy_level(self: TorchBackend, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(x[x > 0.5].median()))

    monkeypatch.setattr(TorchBackend, "reconstruct", healthy_level)
    res = evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], cohort["root"] / "out-level",
                                   methods=("residual",), device="cpu", synthetic=False, progress=False))
    summary = res.summary["methods"]["residual"]
    table = res.per_volume.to_pandas()
    prevalence = table["true_ml"].sum() / (table["n_brain_voxels"].sum() * 0.008)
    assert prevalence < 0.05  # chance-level AUPRC would be about this
    assert summary["auprc"] > 0.8
    assert summary["best_dice"] > 0.7


def test_same_inputs_give_identical_figures(result, cohort: dict[str, Path], model) -> None:
    """A rerun (here of PHANES alone: the other methods must not change its figures) repeats every number."""
    again = evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], cohort["root"] / "out-again",
                                     methods=("phanes",), device="cpu", batch_size=16, synthetic=False, progress=False))
    assert again.summary["methods"]["phanes"] == result.summary["methods"]["phanes"]
    first = result.per_volume.filter(pc.equal(result.per_volume["method"], "phanes"))
    assert again.per_volume.equals(first)
    backend, cfg = model
    rows, split = synthetic_subjects(read_manifest(cohort["manifest"]), "test")
    synthetic = run_synthetic(rows, split, backend, cfg, CALIBRATION, ("phanes", "ra"), n_slices=4, seed=0,
                              batch_size=16)  # as evaluate ran it: other batch compositions round differently
    table = result.synthetic.per_slice
    first_two = table.filter(pc.is_in(table["method"], pa.array(["phanes", "ra"])))
    assert synthetic.per_slice.equals(first_two)
    for method in ("phanes", "ra"):
        assert synthetic.summary["methods"][method] == result.synthetic.summary["methods"][method]


def test_unknown_method_lists_valid_ones(cohort: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="valid methods: phanes, ra, phanes-gt, residual"):
        evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], cohort["root"] / "bad",
                                 methods=("phanes", "anoddpm"), progress=False))
    assert validate_methods([" PHANES", "ra", "phanes"]) == ("phanes", "ra")
    with pytest.raises(ConfigError, match="batch size"):
        evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], cohort["root"] / "bad", batch_size=0,
                                 progress=False))


def test_bad_manifests_are_input_errors(cohort: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no rows in split 'holdout'"):
        evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], tmp_path / "a", split="holdout", progress=False))
    with pytest.raises(InputError, match="no row of split 'val' has a lesion_mask"):
        evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], tmp_path / "b", split="val", progress=False))
    rows = read_manifest(cohort["manifest"])
    small = _save(tmp_path / "small_lesion.nii.gz", np.zeros((20, 20, 20)))
    bad = [ManifestRow(id="p1", image=rows[0].image, brain_mask=rows[0].brain_mask, lesion_mask=small, split="test")]
    manifest = write_manifest(bad, tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="mask shape"):
        evaluate(EvaluateOptions(cohort["bundle"], manifest, tmp_path / "c", device="cpu", synthetic=False,
                                 progress=False))


def test_one_source_brain_at_a_time(cohort: dict[str, Path], tmp_path: Path) -> None:
    """--source keeps the rows of the named source brains only: the report per test brain."""
    rows = read_manifest(cohort["manifest"])
    brains = {"p1": "brain-a", "p2": "brain-b", "h1": "brain-a", "h2": "brain-v"}
    tagged = [dataclasses.replace(r, extra={**r.extra, "source": brains[r.id]}) for r in rows]
    manifest = write_manifest(tagged, cohort["root"] / "tagged.parquet")
    one = evaluate(EvaluateOptions(cohort["bundle"], manifest, tmp_path / "a", device="cpu", batch_size=16,
                                   synthetic=False, progress=False, sources=("brain-a",)))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["settings"]["sources"] == ["brain-a"] and summary["settings"]["n_volumes"] == 1
    assert summary["settings"]["healthy_controls"] == ["h1"]
    ids = set(pq.read_table(tmp_path / "a" / "per_volume.parquet").column("id").to_pylist())
    assert ids == {"p1"} and one is not None
    assert summary["by_source"] == {}  # one source: the pooled figures are its figures
    # All sources in one pass: each source's block equals a run restricted to that source (the oracle).
    pooled = evaluate(EvaluateOptions(cohort["bundle"], manifest, tmp_path / "all", device="cpu", batch_size=16,
                                      synthetic=False, progress=False))
    every = pooled.summary
    assert sorted(every["by_source"]) == ["brain-a", "brain-b"]  # brain-v has only a val row
    assert every["by_source"]["brain-a"] == summary["methods"]
    table = pq.read_table(tmp_path / "all" / "per_volume.parquet")
    assert dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True)) == {
        "p1": "brain-a", "p2": "brain-b"}
    titles = [t.title for t in render_tables(pooled)]
    assert any("source 'brain-b'" in str(t) for t in titles)
    with pytest.raises(ConfigError, match=r"no rows of source\(s\) brain-z; sources: brain-a, brain-b, brain-v"):
        evaluate(EvaluateOptions(cohort["bundle"], manifest, tmp_path / "b", progress=False, sources=("brain-z",)))
    with pytest.raises(ConfigError, match="the manifest has no source column"):
        evaluate(EvaluateOptions(cohort["bundle"], cohort["manifest"], tmp_path / "c", progress=False,
                                 sources=("brain-a",)))
