"""Healthy controls and recall by lesion size, against plain scipy/numpy recounts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import ndimage

from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import run_volume
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import load_mask, load_volume
from phanes_cli.evaluation.controls import control_false_positives, recall_by_size, size_bin
from phanes_cli.evaluation.evaluate import evaluate
from phanes_cli.evaluation.options import EvaluateOptions
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, write_manifest
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, load_networks
from tests._tiny_cohort import tiny_config

FULL = np.ones((3, 3, 3), dtype=bool)


def test_healthy_control_false_positives_match_scipy() -> None:
    rng = np.random.default_rng(0)
    brain = np.zeros((30, 30, 30), dtype=bool)
    brain[3:-3, 3:-3, 3:-3] = True
    pred = ndimage.gaussian_filter(rng.normal(size=brain.shape), 1.2) > 0.15
    stats = control_false_positives(pred, brain, 0.003375)
    inside = pred & brain
    assert stats.components == ndimage.label(inside, structure=FULL)[1]
    assert stats.ml == inside.sum() * 0.003375
    empty = control_false_positives(np.zeros_like(pred), brain, 1.0)
    assert (empty.components, empty.ml) == (0, 0.0)


def test_recall_by_size_bins() -> None:
    voxel_ml = 0.001  # 1 mm voxels
    truth = np.zeros((60, 60, 60), dtype=bool)
    truth[2:5, 2:5, 2:5] = True  # 27 voxels = 0.027 mL: < 1 mL, missed
    truth[10:12, 10:12, 10:12] = True  # 0.008 mL: < 1 mL, found
    truth[20:31, 20:31, 20:31] = True  # 1.331 mL: 1-10 mL, found
    truth[35:58, 35:58, 35:58] = True  # 12.167 mL: > 10 mL, missed
    pred = np.zeros_like(truth)
    pred[11, 11, 11] = pred[25, 25, 25] = True
    pred[0, 59, 0] = True  # a false positive changes no recall
    brain = np.ones_like(truth)
    assert recall_by_size(pred, truth, brain, voxel_ml) == {"<1 mL": (1, 2), "1-10 mL": (1, 1), ">10 mL": (0, 1)}
    assert [size_bin(v) for v in (0.0, 0.999, 1.0, 10.0, 10.01)] == ["<1 mL", "<1 mL", "1-10 mL", ">10 mL", ">10 mL"]


def _blob(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured tissue inside an ellipsoid: (image, brain)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0)) < 1.0
    image = (100 + 15 * np.sin(5 * grid[0]) * np.cos(4 * grid[1]) + rng.normal(0, 2.0, shape)) * brain
    return image.astype(np.float32), brain


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An untrained tiny calibrated bundle evaluated on 2 lesion volumes and 2 healthy controls (split test)."""
    root = tmp_path_factory.mktemp("controls")
    torch.manual_seed(0)
    cfg = tiny_config()
    nets = PhanesNetworks(cfg)
    save_bundle(root / "bundle", cfg, nets.ra, nets.generator, calibration=Calibration(0.05, 0.02))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for k, kind in enumerate(("stroke", "stroke", "healthy", "healthy", "healthy")):
        image, brain = _blob((40, 48, 24), k)
        lesion = None
        if kind == "stroke":
            idx = np.indices(image.shape)
            truth = ((idx - np.array([20, 24, 12])[:, None, None, None]) ** 2).sum(0) <= (3 + 3 * k) ** 2
            truth[8:10, 30:32, 10:12] = True  # a second, tiny lesion (< 1 mL)
            image = np.where(truth, 40.0, image).astype(np.float32)
            lesion = root / f"v{k}_lesion.nii.gz"
            nib.save(nib.Nifti1Image(truth.astype(np.uint8), affine), str(lesion))
        nib.save(nib.Nifti1Image(image, affine), str(root / f"v{k}.nii.gz"))
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(root / f"v{k}_brain.nii.gz"))
        rows.append(ManifestRow(id=f"v{k}", image=root / f"v{k}.nii.gz", brain_mask=root / f"v{k}_brain.nii.gz",
                                lesion_mask=lesion, split="val" if k == 4 else "test", kind=kind))
    manifest = write_manifest(rows, root / "manifest.parquet")
    evaluate(EvaluateOptions(root / "bundle", manifest, root / "out", methods=("phanes", "ra"), synthetic=False,
                             progress=False, device="cpu", batch_size=16))
    return root / "bundle", manifest, root / "out"


def _oracle_masks(bundle: Path, row: ManifestRow) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per method: (prediction, evaluated region, voxel mL) from the pipeline's maps, thresholded here."""
    model = load_bundle(bundle)
    cal = model.calibration
    assert cal is not None and row.brain_mask is not None
    volume = load_volume(row.image)
    brain = load_mask(row.brain_mask, volume)
    maps = run_volume(volume.data, brain, volume.zooms, TorchBackend(load_networks(model), torch.device("cpu")),
                      model.config, cal.mask_threshold, 16)
    processed = np.zeros(brain.shape[2], dtype=bool)
    processed[prepare_volume(volume.data, brain, model.config.preprocess, volume.zooms).geometry.covered] = True
    region = brain & processed[None, None, :]
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    assert maps.stage1_map is not None
    return {"phanes": ((maps.anomaly >= cal.anomaly_threshold) & (maps.anomaly > 0) & region, region, voxel_ml),
            "ra": ((maps.stage1_map > cal.mask_threshold) & region, region, voxel_ml)}


def test_healthy_controls_are_scored_as_all_negative(evaluated: tuple[Path, Path, Path]) -> None:
    bundle, manifest, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    controls = [r for r in read_manifest(manifest) if r.kind == "healthy" and r.split == "test"]
    assert summary["settings"]["healthy_controls"] == [r.id for r in controls]
    table = pq.read_table(out / "healthy_controls.parquet").to_pylist()
    for method in ("phanes", "ra"):
        comps, mls = [], []
        for row in controls:
            pred, _, voxel_ml = _oracle_masks(bundle, row)[method]
            comps.append(ndimage.label(pred, structure=FULL)[1])
            mls.append(pred.sum() * voxel_ml)
            stored = next(t for t in table if t["method"] == method and t["id"] == row.id)
            assert stored["fp_components"] == comps[-1] and stored["fp_ml"] == pytest.approx(mls[-1])
        got = summary["methods"][method]["healthy_controls"]
        assert got["volumes"] == 2
        assert got["fp_components_per_volume"] == pytest.approx(np.mean(comps))
        assert got["fp_ml_per_volume"] == pytest.approx(np.mean(mls))


def test_lesion_recall_by_size_in_the_summary(evaluated: tuple[Path, Path, Path]) -> None:
    bundle, manifest, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    lesion_rows = [r for r in read_manifest(manifest) if r.kind == "stroke"]
    for method in ("phanes", "ra"):
        expected = {"<1 mL": [0, 0], "1-10 mL": [0, 0], ">10 mL": [0, 0]}
        for row in lesion_rows:
            pred, region, voxel_ml = _oracle_masks(bundle, row)[method]
            assert row.lesion_mask is not None
            truth = (np.asarray(nib.load(row.lesion_mask).dataobj) > 0) & region
            labels, n = ndimage.label(truth, structure=FULL)
            for k in range(1, n + 1):
                size = (labels == k).sum() * voxel_ml
                name = "<1 mL" if size < 1 else "1-10 mL" if size < 10 else ">10 mL"
                expected[name][0] += int((pred & (labels == k)).any())
                expected[name][1] += 1
        got = summary["methods"][method]["lesion_recall_by_size"]
        assert {k: [v["found"], v["total"]] for k, v in got.items()} == expected
