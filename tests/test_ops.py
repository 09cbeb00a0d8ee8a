"""Batched pre/post-processing ops against scipy/numpy references; every op must stay per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from phanes_cli.config import MaskConfig
from phanes_cli.core import ops
from phanes_cli.errors import ConfigError
from phanes_kernels.clahe import clahe_torch


@pytest.mark.parametrize("sigma", [0.5, 1.2, 2.0, 6.0, 20.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    """scipy's default mode 'reflect' (edge sample repeated), truncate 4; sigma 20 needs several reflections."""
    x = torch.rand(3, 2, 40, 33, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = ops.gaussian_blur(x, sigma).numpy()
    reference = np.stack([[gaussian_filter(x[i, c].numpy(), sigma) for c in range(2)] for i in range(3)])
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    ours32 = ops.gaussian_blur(x.float(), sigma)
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), reference, atol=1e-5)


def test_gaussian_blur_zero_sigma_is_identity() -> None:
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(ops.gaussian_blur(x, 0.0), x)


def test_dilate_mask_is_per_image() -> None:
    masks = torch.zeros(4, 1, 32, 32)
    masks[0, 0, 0:3, 10:14] = 1  # touches the top edge: the reference code's batch filter leaks it into image 1
    masks[2, 0, 29:32, 5:8] = 1  # bottom edge, next to image 3
    out = ops.dilate_mask(masks)
    assert float(out[1].sum()) == 0 and float(out[3].sum()) == 0
    for i in range(4):
        assert torch.equal(out[i : i + 1], ops.dilate_mask(masks[i : i + 1]))
        expected = (gaussian_filter(masks[i, 0].numpy().astype(np.float64), 1.2) > 0.1).astype(np.float32)
        np.testing.assert_array_equal(out[i, 0].numpy(), expected)
    # The batch-wide filter of the reference code would have leaked: show the test can tell.
    leaky = gaussian_filter(masks[:, 0].numpy().astype(np.float64), 1.2) > 0.1
    assert leaky[1].any()


def test_dilate_mask_grows_about_one_pixel() -> None:
    mask = torch.zeros(1, 1, 21, 21, dtype=torch.bool)
    mask[0, 0, 10, 10] = True
    mask[0, 0, 5:8, 5:8] = True
    out = ops.dilate_mask(mask)
    assert out.dtype == torch.float32 and set(out.unique().tolist()) <= {0.0, 1.0}
    assert bool((out[mask] == 1).all())
    assert float(out[0, 0, 6, 8]) == 1.0 and float(out[0, 0, 6, 9]) == 0.0  # the 3x3 block grows by one pixel
    assert float(out[0, 0, 4, 4]) == 1.0 and float(out[0, 0, 3, 3]) == 0.0  # a one-pixel ring, corners included
    assert float(out[0, 0, 10, 11]) == 0.0  # an isolated pixel is kept, not grown (as with scipy)


@pytest.mark.parametrize("q", [0.0, 37.5, 95.0, 99.0, 100.0])
def test_percentile_matches_numpy(q: float) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 20, 17, generator=gen, dtype=torch.float64)
    where = torch.rand(5, 1, 20, 17, generator=gen) > 0.6
    where[3] = False
    where[4] = False
    where[4, 0, 7, 7] = True  # one pixel
    ours = ops.percentile_per_image(x, q, where)
    assert ours.shape == (5, 1, 1, 1)
    for i in range(5):
        selected = x[i][where[i]].numpy()
        expected = np.percentile(selected, q) if selected.size else 0.0
        assert float(ours[i]) == pytest.approx(expected, abs=1e-12)
    everything = ops.percentile_per_image(x, q)
    expected_all = np.percentile(x.reshape(5, -1).numpy(), q, axis=1)
    np.testing.assert_allclose(everything.flatten().numpy(), expected_all, atol=1e-12)


def test_percentile_rejects_bad_q() -> None:
    with pytest.raises(ValueError, match="percentile"):
        ops.percentile_per_image(torch.rand(1, 1, 4, 4), 101.0)


def test_norm_percentile() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 16, 16, generator=gen) * torch.tensor([1.0, 5.0, 0.0]).view(3, 1, 1, 1)
    out = ops.norm_percentile(x, 95.0)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    for i in range(2):
        p95 = np.percentile(x[i].numpy(), 95)
        np.testing.assert_allclose(out[i].numpy(), np.clip(x[i].numpy() / p95, 0, 1), rtol=1e-5, atol=1e-6)
        assert float((out[i] == 1).float().mean()) == pytest.approx(0.05, abs=0.01)
    assert float(out[2].abs().max()) == 0.0  # an all-zero residual stays zero, no NaN
    where = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    where[:, :, :8] = True
    restricted = ops.norm_percentile(x, 95.0, where)
    p95 = np.percentile(x[0][where[0]].numpy(), 95)
    np.testing.assert_allclose(restricted[0].numpy(), np.clip(x[0].numpy() / p95, 0, 1), rtol=1e-5, atol=1e-6)


def test_clahe_dispatch_uses_config() -> None:
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    cfg = MaskConfig(clahe_tiles=4, clahe_clip=0.03, clahe_bins=128)
    assert torch.equal(ops.clahe(x, cfg), clahe_torch(x, tiles=4, clip_limit=0.03, nbins=128))
    assert not torch.equal(ops.clahe(x, cfg), ops.clahe(x, MaskConfig()))


def test_kernel_choice_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert not ops.use_triton(cpu)  # auto: Triton only for CUDA tensors
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    assert ops.use_triton(cpu)
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    assert not ops.use_triton(cpu)
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(ConfigError, match="PHANES_KERNELS must be 'auto', 'triton' or 'torch', got 'cuda'"):
        ops.clahe(torch.rand(1, 1, 16, 16), MaskConfig())


def _fused_inputs(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {k: torch.rand(4, 1, 24, 24, generator=gen) for k in ("eq_x", "eq_rec", "lpips", "x", "completed", "x_ph")}
    t["brain"] = (torch.rand(4, 1, 24, 24, generator=gen) > 0.3).float()
    t["brain"][1] = 0  # an all-zero brain
    t["mask"] = (torch.rand(4, 1, 24, 24, generator=gen) > 0.6).float()
    t["mask"][2] = 0  # an empty mask
    return t


def _mask_step(eq_x: torch.Tensor, eq_rec: torch.Tensor, lpips: torch.Tensor, brain: torch.Tensor, threshold: float,
               cfg: MaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask generation after the networks: (stage 1 map m(x), binary dilated inpainting mask)."""
    m = ops.stage1_map(eq_x, eq_rec, lpips, brain, cfg)
    return m, ops.binary_mask(m, brain, threshold, cfg)


@pytest.mark.parametrize("per_image", [None, 90.0])
def test_mask_step_reference_matches_scipy(monkeypatch: pytest.MonkeyPatch, per_image: float | None) -> None:
    """Eq. 3 one image at a time with numpy percentiles and scipy filters in float64."""
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    t, cfg = _fused_inputs(5), MaskConfig(per_image_percentile=per_image)
    ra, mask = _mask_step(t["eq_x"], t["eq_rec"], t["lpips"], t["brain"], 0.2, cfg)
    for i in range(4):
        a, b, lp, br = (t[k][i, 0].double().numpy() for k in ("eq_x", "eq_rec", "lpips", "brain"))
        residual = np.abs(b - a) * br
        p = np.percentile(residual[br > 0], 95) if br.any() else 0.0
        expected = np.clip(residual / max(p, 1e-8), 0, 1) * gaussian_filter(lp, 2.0) * br
        np.testing.assert_allclose(ra[i, 0].numpy(), expected, atol=1e-5)
        level = np.percentile(expected[br > 0], per_image) if per_image is not None and br.any() else 0.2
        raw = ((expected > level) & (br > 0)).astype(np.float64)
        np.testing.assert_array_equal(mask[i, 0].numpy(), (gaussian_filter(raw, 1.2) > 0.1) * br)
    assert float(ra[1].abs().max()) == 0 and float(mask[1].sum()) == 0 and float(mask.sum()) > 0


def test_anomaly_map_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    t = _fused_inputs(6)
    x_ph = ops.compose(t["x"], t["completed"], t["mask"])
    x, g, m, br, lp = (t[k].numpy().astype(np.float64) for k in ("x", "completed", "mask", "brain", "lpips"))
    np.testing.assert_allclose(x_ph.numpy(), x * (1 - m) + g * m, atol=1e-6)
    anomaly = ops.anomaly_map(t["x"], t["x_ph"], t["lpips"], t["mask"], t["brain"])
    score = np.abs(t["x_ph"].numpy().astype(np.float64) - x) * lp * m * br
    np.testing.assert_allclose(anomaly.numpy(), score, atol=1e-6)
    assert not anomaly[1].any() and not anomaly[2].any() and anomaly.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_steps_on_cuda_match_cpu_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (auto: the Triton kernels) the fused steps give the CPU reference's values."""
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    t = _fused_inputs(7)
    x = torch.rand(64, 1, 128, 128, generator=torch.Generator().manual_seed(8))
    assert torch.equal(ops.clahe(x.cuda(), MaskConfig()).cpu(), ops.clahe(x, MaskConfig()))
    for cfg in (MaskConfig(), MaskConfig(per_image_percentile=90.0)):
        args = (t["eq_x"], t["eq_rec"], t["lpips"], t["brain"], 0.2)
        ra, mask = _mask_step(*(a.cuda() for a in args[:4]), args[4], cfg)
        ra_ref, mask_ref = _mask_step(*args, cfg)
        torch.testing.assert_close(ra.cpu(), ra_ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(mask.cpu(), mask_ref)
    gpu = {k: v.cuda() for k, v in t.items()}
    composed = ops.compose(gpu["x"], gpu["completed"], gpu["mask"]).cpu()
    assert torch.equal(composed, ops.compose(t["x"], t["completed"], t["mask"]))
    fast = ops.anomaly_map(gpu["x"], gpu["x_ph"], gpu["lpips"], gpu["mask"], gpu["brain"])
    assert torch.equal(fast.cpu(), ops.anomaly_map(t["x"], t["x_ph"], t["lpips"], t["mask"], t["brain"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ops_on_cuda_match_cpu() -> None:
    x = torch.rand(4, 1, 128, 128)
    where = x > 0.3
    for fn in (
        lambda t, w: ops.gaussian_blur(t, 2.0),
        lambda t, w: ops.dilate_mask(t > 0.9),
        lambda t, w: ops.percentile_per_image(t, 95.0, w),
        lambda t, w: ops.norm_percentile(t, 95.0, w),
        lambda t, w: ops.clahe(t, MaskConfig()),
    ):
        torch.testing.assert_close(fn(x.cuda(), where.cuda()).cpu(), fn(x, where), atol=1e-5, rtol=0)
