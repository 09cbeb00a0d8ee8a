"""Stage 2 skipped where the inpainting mask is empty (`pipeline.stage2_maps`, `infer_slices`).

Oracle: the computation before the skip, written out with the backend's network calls: stage 1, m(x) and the
mask in batches, then the generator and the second LPIPS pass on every slice of each batch (empty masks
included), x_ph = x(1 - m) + G m and s = |x_ph - x| LPIPS(x_ph, x) m brain. Real brain slices (the shipped
MNI152 template), a seeded untrained tiny model, torch and ONNX Runtime. Where the batch a slice's stage 2 runs
in changes (the skip gathers the non-empty slices), torch's LPIPS differs in the last float bits (measured
2.4e-7 on the cpu config); the generator and ONNX Runtime were bit-identical. Skipped slices are exact.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from torch import Tensor

from phanes_cli.config import PhanesConfig
from phanes_cli.core import ops
from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.core.pipeline import infer_slices, run_slices, stage1_map
from phanes_cli.core.slice_context import context_average
from phanes_cli.runtimes.export import export_bundle
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.select import choose_backend
from tests._tiny_cohort import untrained_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BATCH = 8
N_SLICES = 24
TOL = 1e-6  # active slices, batch composition changed (float rounding); skipped slices are compared exactly


class Counting:
    """A backend that counts its calls and the slices each network saw."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.calls: Counter[str] = Counter()
        self.slices: Counter[str] = Counter()

    def _count(self, name: str, n: int) -> None:
        self.calls[name] += 1
        self.slices[name] += n

    def reconstruct(self, x: Tensor) -> Tensor:
        self._count("reconstruct", x.shape[0])
        return self.inner.reconstruct(x)

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        self._count("inpaint", mask.shape[0])
        return self.inner.inpaint(masked, mask)

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        self._count("lpips", a.shape[0])
        return self.inner.lpips(a, b)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    folder = untrained_bundle(tmp_path_factory.mktemp("skip") / "bundle", seed=0)
    export_bundle(folder)
    return load_bundle(folder, require_calibration=False)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend(request: pytest.FixtureRequest, bundle: Bundle) -> Backend:
    return choose_backend(request.param, bundle, CPU)


def with_context(cfg: PhanesConfig, on: bool) -> PhanesConfig:
    return dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, slice_context=on))


def unskipped(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig, threshold: float,
              given: Tensor | None = None) -> dict[str, Tensor]:
    """The oracle (module docstring): every slice of every batch through stage 2, no skipping."""
    batches = [slice(i, i + BATCH) for i in range(0, x.shape[0], BATCH)]
    x_cph = torch.cat([backend.reconstruct(x[b]) for b in batches])
    m = torch.cat([stage1_map(x[b], x_cph[b], brain[b], backend, cfg.mask) for b in batches])
    if cfg.mask.slice_context:
        m = context_average(m, brain)
    if given is None:
        mask = torch.cat([ops.binary_mask(m[b], brain[b], threshold, cfg.mask) for b in batches])
    else:
        mask = (given > 0.5).float() * brain
    x_ph, s = [], []
    for b in batches:
        g = backend.inpaint(x[b] * (1 - mask[b]) + mask[b], mask[b])
        x_ph.append(x[b] * (1 - mask[b]) + g * mask[b])
        s.append((x_ph[-1] - x[b]).abs() * backend.lpips(x_ph[-1], x[b]) * mask[b] * brain[b])
    return {"stage1_map": m, "inpaint_mask": mask, "x_ph": torch.cat(x_ph), "anomaly": torch.cat(s)}


def half_empty_threshold(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig) -> float:
    """A mask threshold between two slices' maxima of m(x): about half the slices get an empty mask."""
    m = unskipped(x, brain, backend, cfg, float("inf"))["stage1_map"]
    peaks = (m * brain).flatten(1).max(dim=1).values.sort().values
    k = peaks.numel() // 2
    return float(peaks[k - 1] + peaks[k]) / 2


def check_against(maps: dict[str, np.ndarray], oracle: dict[str, Tensor]) -> int:
    """Skipped slices exactly as the oracle (x_ph = x, s = 0), the others within TOL; returns the skipped count."""
    mask = oracle["inpaint_mask"].numpy()
    np.testing.assert_array_equal(maps["inpaint_mask"], mask > 0.5)
    empty = mask.reshape(len(mask), -1).max(axis=1) == 0
    for name in ("x_ph", "anomaly"):
        want = oracle[name].numpy()
        np.testing.assert_array_equal(maps[name][empty], want[empty])
        np.testing.assert_allclose(maps[name][~empty], want[~empty], atol=TOL, rtol=0)
    assert (maps["anomaly"][empty] == 0).all()
    return int(empty.sum())


@pytest.mark.parametrize("context", [False, True], ids=["plain", "slice-context"])
def test_skipping_gives_the_unskipped_maps_on_real_slices(backend: Backend, bundle: Bundle, context: bool) -> None:
    cfg = with_context(bundle.config, context)
    x, brain = brain_slices(cfg.preprocess, N_SLICES)
    threshold = half_empty_threshold(x, brain, backend, cfg)
    counting = Counting(backend)
    got = infer_slices(x, brain, counting, cfg, threshold, BATCH, keep=("x_ph", "stage1_map"))
    oracle = unskipped(x, brain, backend, cfg, threshold)
    np.testing.assert_array_equal(got.stage1_map, oracle["stage1_map"].numpy())
    skipped = check_against(dataclasses.asdict(got), oracle)
    assert 0 < skipped < N_SLICES and got.slices_inpainted == N_SLICES - skipped
    # stage 2 and the second LPIPS pass saw only the inpainted slices, gathered into full batches
    assert counting.slices["inpaint"] == N_SLICES - skipped
    assert counting.calls["inpaint"] == -(-(N_SLICES - skipped) // BATCH)
    assert counting.slices["lpips"] == N_SLICES + N_SLICES - skipped


def test_phanes_gt_skips_empty_given_masks_and_stage1_when_not_kept(backend: Backend, bundle: Bundle) -> None:
    cfg = bundle.config
    x, brain = brain_slices(cfg.preprocess, N_SLICES)
    given = torch.zeros_like(x)
    given[::3, :, 10:18, 12:20] = 1.0  # a square lesion on every third slice, nothing on the others
    counting = Counting(backend)
    got = infer_slices(x, brain, counting, cfg, 0.5, BATCH, keep=("x_ph",), given_mask=given)
    skipped = check_against(dataclasses.asdict(got), unskipped(x, brain, backend, cfg, 0.5, given))
    assert skipped == N_SLICES - N_SLICES // 3
    assert counting.calls["reconstruct"] == 0 and counting.slices["inpaint"] == N_SLICES // 3


def test_an_all_empty_batch_never_calls_the_generator(backend: Backend, bundle: Bundle) -> None:
    cfg = bundle.config
    x, brain = brain_slices(cfg.preprocess, N_SLICES)
    counting = Counting(backend)
    maps = run_slices(x[:BATCH], brain[:BATCH], counting, cfg, float("inf"))
    assert maps.inpaint_mask.sum() == 0 and counting.calls["inpaint"] == 0
    assert counting.calls["lpips"] == 1  # stage 1's only
    assert torch.equal(maps.x_ph, x[:BATCH]) and torch.equal(maps.anomaly, torch.zeros_like(maps.anomaly))
    volume = infer_slices(x, brain, counting, cfg, float("inf"), BATCH, keep=("x_ph",))
    assert counting.calls["inpaint"] == 0 and volume.slices_inpainted == 0
    assert volume.x_ph is not None and np.array_equal(volume.x_ph, x.numpy()) and not volume.anomaly.any()


def test_a_non_finite_stage1_map_fails_the_volume_even_when_not_kept(bundle: Bundle) -> None:
    """A NaN LPIPS map gives a NaN m(x), whose mask is empty: without the check on m(x), the skip would let the
    volume pass as clean (before the skip, the second LPIPS pass made its s(x) NaN)."""
    broken = Counting(choose_backend("torch", bundle, CPU))
    broken.lpips = lambda a, b: torch.full_like(a, float("nan"))  # type: ignore[method-assign]
    x, brain = brain_slices(bundle.config.preprocess, 4)
    with pytest.raises(FloatingPointError, match=r"stage 1 map \(slice\(s\) 0, 1, 2, 3 of 4\)"):
        infer_slices(x, brain, broken, bundle.config, 0.5, BATCH)
    assert broken.calls["inpaint"] == 0


def test_normalised_map_is_the_map_over_the_median_of_the_volumes_stage1_map(backend: Backend, bundle: Bundle) -> None:
    """`mask.normalise_map`: s(x) divided by the median of m(x) over every brain pixel of the volume's slices (the
    oracle's maps, numpy's median); masks, x_ph and m unchanged; PHANES-GT (a given mask) is not divided."""
    cfg = bundle.config
    on = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, normalise_map=True))
    x, brain = brain_slices(cfg.preprocess, N_SLICES)
    threshold = half_empty_threshold(x, brain, backend, cfg)
    oracle = unskipped(x, brain, backend, cfg, threshold)
    median = float(np.median(oracle["stage1_map"].numpy()[brain.numpy() > 0]))
    assert median > 0
    got = infer_slices(x, brain, backend, on, threshold, BATCH, keep=("x_ph", "stage1_map"))
    assert got.map_scale == pytest.approx(median, rel=1e-6)
    np.testing.assert_allclose(got.anomaly * median, oracle["anomaly"].numpy(), atol=TOL, rtol=1e-5)
    np.testing.assert_array_equal(got.inpaint_mask, oracle["inpaint_mask"].numpy() > 0.5)
    plain = infer_slices(x, brain, backend, cfg, threshold, BATCH)
    assert plain.map_scale == 1.0
    given = oracle["inpaint_mask"]
    gt = infer_slices(x, brain, backend, on, threshold, BATCH, given_mask=given)
    assert gt.map_scale == 1.0
    np.testing.assert_allclose(gt.anomaly, unskipped(x, brain, backend, cfg, threshold, given)["anomaly"].numpy(),
                               atol=TOL, rtol=0)
