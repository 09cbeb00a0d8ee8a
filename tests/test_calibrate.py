"""Calibration: both thresholds equal percentiles recomputed independently, and they are sealed into the bundle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from phanes_cli.backends import PhanesNetworks, TorchBackend
from phanes_cli.bundle import load_bundle, save_bundle
from phanes_cli.calibrate import calibrate, calibration_thresholds, stage1_percentile
from phanes_cli.errors import BundleError, ConfigError, PhanesError
from phanes_cli.manifest import read_manifest
from phanes_cli.pipeline import binary_mask, stage1_map
from phanes_cli.preprocess import prepare_volume
from phanes_cli.training.data import SliceSet
from phanes_cli.volume_io import load_mask, load_volume
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


def _independent_thresholds(bundle: Path, manifest: Path) -> tuple[float, float, int]:
    """method.md's rules written out directly on all validation slices in one batch."""
    model = load_bundle(bundle, require_calibration=False)
    cfg = model.config
    xs, brains = [], []
    for row in read_manifest(manifest):
        if row.split == "val" and row.kind == "healthy":
            volume = load_volume(row.image)
            prepared = prepare_volume(volume.data, load_mask(row.brain_mask, volume), cfg.preprocess)
            xs.append(prepared.slices)
            brains.append(prepared.brain)
    x, brain = torch.cat(xs), torch.cat(brains)
    nets = model.networks()
    backend = TorchBackend(nets, torch.device("cpu"))
    with torch.no_grad():
        ra_map = stage1_map(x, nets.ra.reconstruct(x), brain, backend, cfg.mask)
        t_mask = float(np.percentile(ra_map[brain > 0].double().numpy(), cfg.mask.mask_percentile))
        m = binary_mask(ra_map, brain, t_mask, cfg.mask)
        x_ph = x * (1 - m) + nets.generator(x * (1 - m) + m, m) * m
        s = (x_ph - x).abs() * nets.lpips(x_ph, x) * m * brain
    positive = s[(s > 0) & (brain > 0)].double().numpy()
    return t_mask, float(np.percentile(positive, cfg.mask.anomaly_percentile)), int(x.shape[0])


def test_thresholds_are_the_percentiles_of_healthy_maps(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    hash_before = load_bundle(bundle, require_calibration=False).hash
    cal = calibrate(bundle, manifest, device="cpu", batch_size=7, progress=False)
    t_mask, t_anomaly, n_slices = _independent_thresholds(bundle, manifest)
    assert cal.mask_threshold == pytest.approx(t_mask, rel=1e-4)
    assert cal.anomaly_threshold == pytest.approx(t_anomaly, rel=1e-3)
    assert math.isfinite(cal.anomaly_threshold)
    assert cal.anomaly_threshold > 0
    assert (cal.n_slices, cal.n_volumes) == (n_slices, 2)
    stored = load_bundle(bundle)  # now calibrated: require_calibration passes
    assert stored.calibration == cal
    assert stored.hash != hash_before


def test_calibration_needs_healthy_volumes_of_the_split(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    with pytest.raises(ConfigError, match="'test'"):
        calibrate(bundle, manifest, device="cpu", split="test", progress=False)
    with pytest.raises(BundleError):
        load_bundle(bundle)  # still uncalibrated: nothing was written


def test_calibration_refuses_a_missing_bundle(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, n_train=0, n_val=1)
    with pytest.raises(BundleError, match="not found"):
        calibrate(tmp_path / "nowhere", manifest, device="cpu", progress=False)


def test_percentile_override_is_stored_in_the_bundle(setup: tuple[Path, Path]) -> None:
    bundle, manifest = setup
    weights_before = load_bundle(bundle, require_calibration=False).ra_state
    cal = calibrate(bundle, manifest, device="cpu", batch_size=16, progress=False, mask_percentile=90.0)
    stored = load_bundle(bundle)
    assert stored.config.mask.mask_percentile == 90.0
    assert stored.calibration == cal
    assert all(torch.equal(weights_before[k], v) for k, v in stored.ra_state.items())
    t_mask, _, _ = _independent_thresholds(bundle, manifest)  # recomputed with the stored 90th percentile
    assert cal.mask_threshold == pytest.approx(t_mask, rel=1e-4)
    with pytest.raises(ConfigError, match="between 0 and 100"):
        calibrate(bundle, manifest, device="cpu", progress=False, anomaly_percentile=100.0)


def test_slices_without_brain_pixels_give_no_mask_threshold(setup: tuple[Path, Path]) -> None:
    """The shared stage 1 percentile is NaN without brain pixels; calibration then refuses with one clear line."""
    bundle, _ = setup
    model = load_bundle(bundle, require_calibration=False)
    backend = TorchBackend(model.networks(), torch.device("cpu"))
    size = model.config.preprocess.image_size
    no_brain = torch.zeros(3, 1, size, size)
    empty = SliceSet(torch.rand(3, 1, size, size), no_brain, torch.zeros(3, dtype=torch.int64), ("a",))
    assert math.isnan(stage1_percentile(backend, empty, model.config.mask, batch_size=2))
    with pytest.raises(PhanesError, match="no brain pixels"):
        calibration_thresholds(backend, empty, model.config)


def test_minimum_lesion_size_is_the_percentile_of_healthy_largest_components(setup: tuple[Path, Path]) -> None:
    """Without --tune, min_lesion_ml is the anomaly percentile of each healthy volume's largest component (scipy)."""
    from scipy import ndimage

    from phanes_cli.pipeline import run_volume

    bundle, manifest = setup
    cal = calibrate(bundle, manifest, device="cpu", batch_size=16, progress=False)
    model = load_bundle(bundle)
    backend = TorchBackend(model.networks(), torch.device("cpu"))
    largest = []
    for row in read_manifest(manifest):
        if row.split == "val" and row.kind == "healthy":
            volume = load_volume(row.image)
            brain = load_mask(row.brain_mask, volume)
            s = run_volume(volume.data, brain, backend, model.config, cal, 16, keep=()).anomaly
            labels, n = ndimage.label((s >= cal.anomaly_threshold) & (s > 0) & brain, structure=np.ones((3, 3, 3)))
            largest.append(np.bincount(labels.ravel())[1:].max() * volume.voxel_ml if n else 0.0)
    expected = float(np.percentile(largest, model.config.mask.anomaly_percentile))
    assert cal.min_lesion_ml == pytest.approx(expected) and cal.min_lesion_ml > 0
    assert model.calibration is not None and model.calibration.min_lesion_ml == cal.min_lesion_ml
