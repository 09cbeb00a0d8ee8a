"""Slice context (core.slice_context): m(x) averaged 1/4-1/2-1/4 across neighbouring slices, in inference
(two-pass `infer_slices`) and in calibration (the mask threshold is a percentile of the averaged map)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.core import ops
from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.pipeline import infer_slices, run_slices, stage1_map
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.slice_context import context_average
from phanes_cli.core.volume_io import load_mask, load_volume
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, load_networks
from tests._tiny_cohort import tiny_config, write_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


def _oracle(m: np.ndarray, brain: np.ndarray, runs: list[int]) -> np.ndarray:
    """Slice by slice: 1/4 previous + 1/2 own + 1/4 next of the same run, the slice itself where none."""
    out = np.zeros_like(m)
    for i in range(len(m)):
        prev = m[i - 1] if i > 0 and runs[i - 1] == runs[i] else m[i]
        nxt = m[i + 1] if i + 1 < len(m) and runs[i + 1] == runs[i] else m[i]
        out[i] = (0.25 * prev + 0.5 * m[i] + 0.25 * nxt) * (brain[i] > 0)
    return out


def test_context_average_matches_a_slice_by_slice_oracle() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((7, 1, 5, 5)).astype(np.float32)
    brain = (rng.random((7, 1, 5, 5)) > 0.3).astype(np.float32)
    runs = [0, 0, 0, 1, 1, 2, 2]  # three volumes: no averaging across their boundaries
    got = context_average(torch.from_numpy(m), torch.from_numpy(brain), torch.tensor(runs)).numpy()
    assert np.allclose(got, _oracle(m, brain, runs), atol=1e-7)
    one = context_average(torch.from_numpy(m), torch.from_numpy(brain)).numpy()
    assert np.allclose(one, _oracle(m, brain, [0] * 7), atol=1e-7)
    # a structure in one slice only is halved; one spanning three slices keeps its value in the middle
    spike = np.zeros((5, 1, 1, 1), np.float32)
    spike[2] = 1.0
    assert context_average(torch.from_numpy(spike), torch.ones(5, 1, 1, 1))[2].item() == pytest.approx(0.5)
    assert context_average(torch.ones(3, 1, 1, 1), torch.ones(3, 1, 1, 1))[1].item() == pytest.approx(1.0)
    assert context_average(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4)).shape == (0, 1, 4, 4)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded untrained tiny bundle with slice context on, and a cohort with two healthy validation volumes."""
    folder = tmp_path_factory.mktemp("context")
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, slice_context=True))
    torch.manual_seed(0)
    nets = PhanesNetworks(cfg)
    save_bundle(folder / "bundle", cfg, nets.ra, nets.generator)
    return folder / "bundle", write_cohort(folder / "data", n_train=1, n_val=2)


def _val_slices(bundle: Path, manifest: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = load_bundle(bundle, require_calibration=False).config
    out = []
    for row in read_manifest(manifest):
        if row.split == "val":
            volume = load_volume(row.image)
            prepared = prepare_volume(volume.data, load_mask(row.brain_mask, volume), cfg.preprocess, volume.zooms)
            out.append((prepared.slices, prepared.brain))
    return out


def test_two_pass_inference_binarises_the_averaged_map(model: tuple[Path, Path]) -> None:
    bundle, manifest = model
    loaded = load_bundle(bundle, require_calibration=False)
    cfg = loaded.config
    backend = TorchBackend(load_networks(loaded), torch.device("cpu"))
    x, brain = _val_slices(bundle, manifest)[0]
    off = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, slice_context=False))
    for size in (3, 64):  # batches must not cut the neighbours off
        # the plain m(x) at the same batch size (convolutions round differently per batch size, ~1e-4)
        plain = infer_slices(x, brain, backend, off, 1.0, size, keep=("stage1_map",)).stage1_map
        averaged = _oracle(plain, brain.numpy(), [0] * len(plain))
        threshold = float(np.percentile(averaged[brain.numpy() > 0], 90))
        got = infer_slices(x, brain, backend, cfg, threshold, size, keep=("stage1_map", "inpaint_mask"))
        assert np.allclose(got.stage1_map, averaged, atol=1e-6)
        expected = ops.binary_mask(torch.from_numpy(averaged), brain, threshold, cfg.mask).numpy() > 0.5
        assert np.array_equal(got.inpaint_mask, expected) and expected.any()
        with torch.no_grad():
            reference = run_slices(x, brain, backend, cfg, threshold, given_mask=torch.from_numpy(expected))
        if size == 64:
            assert np.allclose(got.anomaly, reference.anomaly.numpy(), atol=1e-5)


def test_mask_threshold_is_a_percentile_of_the_averaged_map_per_volume(model: tuple[Path, Path]) -> None:
    """Calibration averages within each validation volume (never across the boundary between two volumes)."""
    bundle, manifest = model
    cal = calibrate(CalibrateOptions(manifest=manifest, bundle=bundle, device="cpu", batch_size=5, progress=False))
    loaded = load_bundle(bundle, require_calibration=False)
    nets = load_networks(loaded)
    backend = TorchBackend(nets, torch.device("cpu"))
    values = []
    for x, brain in _val_slices(bundle, manifest):
        with torch.no_grad():
            m = stage1_map(x, nets.ra.reconstruct(x), brain, backend, loaded.config.mask).numpy()
        values.append(_oracle(m, brain.numpy(), [0] * len(m))[brain.numpy() > 0])
    expected = float(np.percentile(np.concatenate(values), loaded.config.mask.mask_percentile))
    assert cal.mask_threshold == pytest.approx(expected, rel=1e-4)


def test_calibrate_can_switch_slice_context_off_and_stores_the_switch(model: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """`calibrate --no-slice-context` on a copy of the bundle: plain m(x) percentile, config stored with it."""
    bundle, manifest = model
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cal = calibrate(CalibrateOptions(manifest=manifest, bundle=copy, device="cpu", batch_size=5, progress=False,
                                     slice_context=False, healthy_fp_budget_ml=2.0, healthy_fp_budget_components=3.0))
    loaded = load_bundle(copy)
    assert loaded.config.mask.slice_context is False and loaded.config.tune.healthy_fp_budget_ml == 2.0
    assert loaded.config.tune.healthy_fp_budget_components == 3.0
    nets = load_networks(loaded)
    backend = TorchBackend(nets, torch.device("cpu"))
    values = []
    for x, brain in _val_slices(copy, manifest):
        with torch.no_grad():
            m = stage1_map(x, nets.ra.reconstruct(x), brain, backend, loaded.config.mask)
        values.append(m[brain > 0].double().numpy())
    assert cal.mask_threshold == pytest.approx(float(np.percentile(np.concatenate(values), 99.0)), rel=1e-4)
    with pytest.raises(ConfigError, match="false-positive budget"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=copy, device="cpu", progress=False,
                                   healthy_fp_budget_ml=-1.0))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="false-positive budget must be a finite number of components"):
            calibrate(CalibrateOptions(manifest=manifest, bundle=copy, device="cpu", progress=False,
                                       healthy_fp_budget_components=bad))
