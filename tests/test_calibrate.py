"""Calibration: both thresholds equal percentiles recomputed independently, and they are sealed into the bundle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from phanes_cli.calibrate.healthy import healthy_calibration
from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.percentiles import stage1_percentile
from phanes_cli.core.pipeline import run_volume, stage1_map
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import load_mask, load_volume
from phanes_cli.errors import BundleError, ConfigError, PhanesError
from phanes_cli.infra.progress import make_progress
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, load_networks
from phanes_cli.training.data import SliceSet
from tests._tiny_cohort import tiny_config, write_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """An (untrained, seeded) tiny model bundle and a cohort with two healthy validation volumes."""
    cfg = tiny_config()
    torch.manual_seed(0)
    nets = PhanesNetworks(cfg)
    save_bundle(tmp_path / "bundle", cfg, nets.ra, nets.generator)
    return tmp_path / "bundle", write_cohort(tmp_path / "data", n_train=1, n_val=2)


def _val_volumes(manifest: Path) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    volumes = []
    for row in read_manifest(manifest):
        if row.split == "val" and row.kind == "healthy":
            volume = load_volume(row.image)
            volumes.append((volume.data, load_mask(row.brain_mask, volume), volume.zooms))
    return volumes


def _independent_mask_threshold(bundle: Path, manifest: Path) -> tuple[float, int]:
    """method.md's rule written out directly on all validation slices in one batch: (threshold, slices)."""
    model = load_bundle(bundle, require_calibration=False)
    cfg = model.config
    prepared = [prepare_volume(data, brain, cfg.preprocess, zooms) for data, brain, zooms in _val_volumes(manifest)]
    x, brain = torch.cat([p.slices for p in prepared]), torch.cat([p.brain for p in prepared])
    nets = load_networks(model)
    backend = TorchBackend(nets, torch.device("cpu"))
    with torch.no_grad():
        m = stage1_map(x, nets.ra.reconstruct(x), brain, backend, cfg.mask)
    return float(np.percentile(m[brain > 0].double().numpy(), cfg.mask.mask_percentile)), int(x.shape[0])


def _volume_grid_scores(bundle: Path, manifest: Path, mask_threshold: float) -> list[np.ndarray]:
    """s(x) > 0 inside the brain of every validation volume, on the volume's own grid (where the lesion rule
    applies the anomaly threshold)."""
    model = load_bundle(bundle, require_calibration=False)
    backend = TorchBackend(load_networks(model), torch.device("cpu"))
    out = []
    for data, brain, zooms in _val_volumes(manifest):
        s = run_volume(data, brain, zooms, backend, model.config, mask_threshold, 16, keep=()).anomaly
        out.append(s[(s > 0) & brain].astype(np.float64))
    return out


def test_thresholds_are_the_percentiles_of_healthy_maps(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    hash_before = load_bundle(bundle, require_calibration=False).hash
    cal = calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", batch_size=7, progress=False))
    t_mask, n_slices = _independent_mask_threshold(bundle, manifest)
    assert cal.mask_threshold == pytest.approx(t_mask, rel=1e-4)
    positive = np.concatenate(_volume_grid_scores(bundle, manifest, cal.mask_threshold))
    assert cal.anomaly_threshold == pytest.approx(float(np.percentile(positive, 99.0)), rel=1e-5)
    assert math.isfinite(cal.anomaly_threshold)
    assert cal.anomaly_threshold > 0
    assert (cal.n_slices, cal.n_volumes) == (n_slices, 2)
    stored = load_bundle(bundle)  # now calibrated: require_calibration passes
    assert stored.calibration == cal
    assert stored.hash != hash_before


def test_anomaly_threshold_is_calibrated_on_the_grid_where_it_is_applied(setup: tuple[Path, Path]) -> None:
    """At the calibrated threshold the healthy validation volumes' voxels with s > 0 (on their own grid, as
    screening thresholds them) exceed it in 1 - percentile/100 of cases, for a percentile that is not the
    default too."""
    bundle, manifest = setup
    for q in (99.0, 90.0):
        cal = calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", batch_size=16,
                                         progress=False, anomaly_percentile=q))
        positive = np.concatenate(_volume_grid_scores(bundle, manifest, cal.mask_threshold))
        exceed = float(np.mean(positive >= cal.anomaly_threshold))
        assert exceed == pytest.approx(1 - q / 100, abs=2.0 / positive.size + 1e-3), q


def test_calibration_needs_healthy_volumes_of_the_split(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    with pytest.raises(ConfigError, match="'test'"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", split="test", progress=False))
    with pytest.raises(BundleError):
        load_bundle(bundle)  # still uncalibrated: nothing was written


def test_calibration_refuses_a_missing_bundle(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, n_train=0, n_val=1)
    with pytest.raises(BundleError, match="not found"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=tmp_path / "nowhere", device="cpu", progress=False))


def test_percentile_override_is_stored_in_the_bundle(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    weights_before = load_bundle(bundle, require_calibration=False).ra_state
    cal = calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", batch_size=16, progress=False,
                                     mask_percentile=90.0))
    stored = load_bundle(bundle)
    assert stored.config.mask.mask_percentile == 90.0
    assert stored.calibration == cal
    assert all(torch.equal(weights_before[k], v) for k, v in stored.ra_state.items())
    t_mask, _ = _independent_mask_threshold(bundle, manifest)  # recomputed with the stored 90th percentile
    assert cal.mask_threshold == pytest.approx(t_mask, rel=1e-4)
    with pytest.raises(ConfigError, match="between 0 and 100"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", progress=False,
                                   anomaly_percentile=100.0))


def test_slices_without_brain_pixels_give_no_mask_threshold(setup: tuple[Path, Path]) -> None:
    """The shared stage 1 percentile is NaN without brain pixels; calibration then refuses with one clear line."""
    bundle, _ = setup
    model = load_bundle(bundle, require_calibration=False)
    backend = TorchBackend(load_networks(model), torch.device("cpu"))
    size = model.config.preprocess.image_size
    no_brain = torch.zeros(3, 1, size, size)
    empty = SliceSet(torch.rand(3, 1, size, size), no_brain, torch.zeros(3, dtype=torch.int64), ("a",))
    assert math.isnan(stage1_percentile(backend, empty.images, empty.brain, model.config.mask, batch_size=2))
    with pytest.raises(PhanesError, match="no brain pixels"):
        healthy_calibration(backend, empty, [], model.config, 2, "never", "cpu", make_progress(False))


def test_minimum_lesion_size_is_the_percentile_of_healthy_largest_components(setup: tuple[Path, Path]) -> None:
    """Without --tune, min_lesion_ml is the anomaly percentile of each healthy volume's largest component (scipy)."""
    from scipy import ndimage

    bundle, manifest = setup
    cal = calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", batch_size=16, progress=False))
    model = load_bundle(bundle)
    backend = TorchBackend(load_networks(model), torch.device("cpu"))
    largest = []
    for row in read_manifest(manifest):
        if row.split == "val" and row.kind == "healthy":
            volume = load_volume(row.image)
            brain = load_mask(row.brain_mask, volume)
            s = run_volume(volume.data, brain, volume.zooms, backend, model.config, cal.mask_threshold, 16,
                           keep=()).anomaly
            labels, n = ndimage.label((s >= cal.anomaly_threshold) & (s > 0) & brain, structure=np.ones((3, 3, 3)))
            largest.append(np.bincount(labels.ravel())[1:].max() * volume.voxel_ml if n else 0.0)
    expected = float(np.percentile(largest, model.config.mask.anomaly_percentile))
    assert cal.min_lesion_ml == pytest.approx(expected) and cal.min_lesion_ml > 0
    assert model.calibration is not None and model.calibration.min_lesion_ml == cal.min_lesion_ml
