"""Every Triton kernel of `phanes_kernels`, run on the CPU by Triton's interpreter, against its torch reference.

The references are the `ops` functions with PHANES_KERNELS=torch (tested against scipy/numpy/skimage in
test_ops.py and test_clahe.py); real slices also go through an independent numpy/scipy oracle here.
TRITON_INTERPRET only applies to kernels defined while it is set, so the module fixture sets it, reloads
the kernel modules, and on teardown restores the environment and reloads them again.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from phanes_cli.config import MaskConfig, PreprocessConfig
from phanes_cli.core import ops
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.volume_io import load_volume
from phanes_cli.infra.packaged_data import mni152_image
from tests.conftest import SHARED_DATA

pytest.importorskip("triton")
skimage_exposure = pytest.importorskip("skimage.exposure")

_KERNEL_MODULES = ("phanes_kernels.clahe_triton", "phanes_kernels.maps_triton")
_ENV = ("TRITON_INTERPRET", ops.KERNELS_ENV)


def _reload_kernels() -> None:
    for name in _KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))


@pytest.fixture(scope="module", autouse=True)
def interpreted() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in _ENV}
    os.environ["TRITON_INTERPRET"] = "1"
    _reload_kernels()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_kernels()


def _both(fn, *args):  # type: ignore[no-untyped-def]
    """fn(*args) through the Triton kernels and through the torch reference."""
    results = []
    for choice in ("triton", "torch"):
        os.environ[ops.KERNELS_ENV] = choice
        results.append(fn(*args))
    return results


def _real_volume() -> np.ndarray:
    colin = SHARED_DATA / "healthy-t1" / "antspy_colin27_ch2_T1.nii.gz"  # named: the folder gains other brains
    if colin.is_file():
        return load_volume(colin).data
    return np.asarray(mni152_image("t1_2mm").dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def real() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Real axial slices and brain masks on 128 and 48 px model grids (five slices across the brain)."""
    data = _real_volume()
    out = {}
    for size in (128, 48):
        prepared = prepare_volume(data, None, PreprocessConfig(image_size=size), (1.0, 1.0, 1.0))
        pick = np.linspace(0, prepared.slices.shape[0] - 1, 5).round().astype(int)
        out[size] = (prepared.slices[pick], prepared.brain[pick])
    return out


def _images(n: int, size: int, seed: int, width: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, width or size, generator=gen)
    return x * x


def _pair(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stand-in reconstruction's equalised pair and a smooth non-negative LPIPS-like map."""
    cfg = MaskConfig(clahe_tiles=4)
    gen = torch.Generator().manual_seed(seed)
    os.environ[ops.KERNELS_ENV] = "torch"
    rec = (ops.gaussian_blur(x, 1.0) + 0.05 * torch.rand(x.shape, generator=gen)).clamp(0, 1)
    lpips = ops.gaussian_blur(torch.rand(x.shape, generator=gen), 0.7) * 0.5
    return ops.clahe(x, cfg), ops.clahe(rec, cfg), lpips


# --- CLAHE ---------------------------------------------------------------------------------------------------


def _clahe_equal(x: torch.Tensor, cfg: MaskConfig) -> torch.Tensor:
    fast, reference = _both(ops.clahe, x, cfg)
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert torch.equal(fast, reference), f"max difference {float((fast - reference).abs().max())}"
    return fast


def test_clahe_real_slices_model_grid(real) -> None:  # type: ignore[no-untyped-def]
    x, _ = real[128]
    out = _clahe_equal(x[:2], MaskConfig())
    expected = np.stack([skimage_exposure.equalize_adapthist(s, kernel_size=16, clip_limit=0.01)
                         for s in x[:2, 0].numpy()])
    np.testing.assert_allclose(out[:, 0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_clahe_batch_sizes(n: int) -> None:
    _clahe_equal(_images(n, 32, seed=n), MaskConfig(clahe_tiles=4))


@pytest.mark.parametrize(("tiles", "clip", "bins"), [(8, 0.01, 256), (4, 0.0, 256), (2, 0.05, 100), (4, 1.0, 64)])
def test_clahe_settings(tiles: int, clip: float, bins: int) -> None:
    """Heavy clipping (tiny tiles at 8 x 8), no clipping, bin counts that are not powers of two, float64 input."""
    x = _images(2, 32, seed=tiles).double()
    _clahe_equal(x, MaskConfig(clahe_tiles=tiles, clahe_clip=clip, clahe_bins=bins))


def test_clahe_constant_and_low_contrast_images() -> None:
    x = torch.stack([torch.zeros(32, 32), torch.full((32, 32), 0.5), torch.ones(32, 32),
                     0.5 + 0.001 * _images(1, 32, seed=5)[0, 0]])[:, None]
    _clahe_equal(x, MaskConfig(clahe_tiles=4))


def test_clahe_other_sizes_use_the_reference() -> None:
    from phanes_kernels.clahe_triton import clahe_triton, supports

    assert supports(128, 128, 8) and supports(32, 48, 4) and not supports(100, 100, 8)
    with pytest.raises(ValueError, match="multiples of the tile"):
        clahe_triton(_images(1, 36, seed=0), tiles=5)
    _clahe_equal(_images(1, 36, seed=0), MaskConfig(clahe_tiles=5))  # dispatch falls back instead


# --- mask step -----------------------------------------------------------------------------------------------


def _mask_step(eq_x, eq_rec, lpips, brain, threshold: float, cfg: MaskConfig):  # type: ignore[no-untyped-def]
    m = ops.stage1_map(eq_x, eq_rec, lpips, brain, cfg)
    return m, ops.binary_mask(m, brain, threshold, cfg)


def _mask_step_equal(eq_x, eq_rec, lpips, brain, threshold: float, cfg: MaskConfig):  # type: ignore[no-untyped-def]
    (ra, mask), (ra_ref, mask_ref) = _both(_mask_step, eq_x, eq_rec, lpips, brain, threshold, cfg)
    torch.testing.assert_close(ra, ra_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(mask, mask_ref)
    # The dilation alone, from the very same map, is exact.
    assert torch.equal(*_both(ops.binary_mask, ra_ref, brain, threshold, cfg))
    return ra, mask


def _numpy_mask_step(eq_x, eq_rec, lpips, brain, threshold: float, cfg: MaskConfig):  # type: ignore[no-untyped-def]
    """Independent oracle: numpy percentiles and scipy filters, one image at a time, in float64."""
    ras, masks = [], []
    for a, b, lp, br in zip(eq_x[:, 0].double().numpy(), eq_rec[:, 0].double().numpy(),
                            lpips[:, 0].double().numpy(), brain[:, 0].double().numpy(), strict=True):
        residual = np.abs(b - a) * br
        p = np.percentile(residual[br > 0], cfg.norm_percentile) if (br > 0).any() else 0.0
        ra = np.clip(residual / max(p, 1e-8), 0, 1) * gaussian_filter(lp, cfg.lpips_sigma) * br
        raw = ((ra > threshold) & (br > 0)).astype(np.float64)
        ras.append(ra)
        masks.append((gaussian_filter(raw, cfg.dilation_sigma) > cfg.dilation_threshold) * br)
    return np.stack(ras), np.stack(masks)


def test_mask_step_real_slices(real) -> None:  # type: ignore[no-untyped-def]
    x, brain = real[48]
    eq_x, eq_rec, lpips = _pair(x, seed=1)
    cfg = MaskConfig(clahe_tiles=4)
    ra, mask = _mask_step_equal(eq_x, eq_rec, lpips, brain, 0.05, cfg)
    ra_np, mask_np = _numpy_mask_step(eq_x, eq_rec, lpips, brain, 0.05, cfg)
    np.testing.assert_allclose(ra[:, 0].numpy(), ra_np, atol=1e-5)
    assert float((mask[:, 0].numpy() != mask_np).mean()) < 1e-3
    assert 0 < float(mask.sum()) < float(brain.sum())


@pytest.mark.parametrize("n", [1, 3, 64])
def test_mask_step_batch_sizes(n: int) -> None:
    x = _images(n, 32, seed=10 + n)
    brain = (ops.gaussian_blur(torch.rand(x.shape, generator=torch.Generator().manual_seed(n)), 2.0) > 0.48).float()
    _mask_step_equal(*_pair(x, seed=n), brain, 0.1, MaskConfig())


@pytest.mark.parametrize("cfg", [MaskConfig(per_image_percentile=90.0), MaskConfig(lpips_sigma=0.0, dilation_sigma=0.5),
                                 MaskConfig(lpips_sigma=20.0, norm_percentile=50.0)])
def test_mask_step_settings_and_non_square(cfg: MaskConfig) -> None:
    """Per-image thresholds, no smoothing, a filter wider than the image (several reflections), 24 x 40 planes."""
    x = _images(3, 24, seed=20, width=40)
    brain = (x > 0.1).float()
    _mask_step_equal(*_pair(x, seed=20), brain, 0.1, cfg)


def test_mask_step_edge_cases() -> None:
    """Identical pair (zero residual), constant images, an all-zero brain, a threshold no pixel reaches."""
    x = _images(4, 32, seed=30)
    eq_x, eq_rec, lpips = _pair(x, seed=30)
    eq_rec[0] = eq_x[0]
    eq_x[1], eq_rec[1] = 0.5, 0.5
    brain = torch.ones_like(x)
    brain[2] = 0
    ra, mask = _mask_step_equal(eq_x, eq_rec, lpips, brain, 0.1, MaskConfig())
    assert float(ra[:3].abs().max()) == 0.0 and float(mask[:3].sum()) == 0.0
    assert float(mask[3].sum()) > 0
    _, empty = _mask_step_equal(eq_x, eq_rec, lpips, brain, 2.0, MaskConfig())
    assert float(empty.sum()) == 0.0


# --- anomaly map ---------------------------------------------------------------------------------------------


def _final_equal(x, completed, lpips, mask, brain):  # type: ignore[no-untyped-def]
    x_ph, x_ph_ref = _both(ops.compose, x, completed, mask)
    assert torch.equal(x_ph, x_ph_ref)
    anomaly, anomaly_ref = _both(ops.anomaly_map, x, x_ph_ref, lpips, mask, brain)
    assert torch.equal(anomaly, anomaly_ref)
    return x_ph, anomaly


def test_anomaly_map_real_slices(real) -> None:  # type: ignore[no-untyped-def]
    x, brain = real[48]
    gen = torch.Generator().manual_seed(40)
    mask = (torch.rand(x.shape, generator=gen) > 0.7).float() * brain
    completed = torch.rand(x.shape, generator=gen)
    lpips = torch.rand(x.shape, generator=gen)
    x_ph, anomaly = _final_equal(x, completed, lpips, mask, brain)
    xn, cn, mn, bn, ln = (t[:, 0].numpy().astype(np.float64) for t in (x, completed, mask, brain, lpips))
    ph = xn * (1 - mn) + cn * mn
    np.testing.assert_allclose(x_ph[:, 0].numpy(), ph, atol=1e-6)
    score = np.abs(ph - xn) * ln * mn * bn
    np.testing.assert_allclose(anomaly[:, 0].numpy(), score, atol=1e-6)
    assert anomaly.any() and not anomaly[brain == 0].any()


@pytest.mark.parametrize("n", [1, 3, 64])
def test_anomaly_map_batch_sizes_and_edge_cases(n: int) -> None:
    gen = torch.Generator().manual_seed(50 + n)
    x, completed, lpips = (torch.rand(n, 1, 32, 32, generator=gen) for _ in range(3))
    mask = (torch.rand(n, 1, 32, 32, generator=gen) > 0.5).float()
    brain = torch.ones_like(x)
    mask[0] = 0  # empty mask
    brain[-1] = 0  # all-zero brain (the same image when n == 1)
    _, anomaly = _final_equal(x, completed, lpips, mask, brain)
    assert float(anomaly[0].abs().max()) == 0.0 and float(anomaly[-1].abs().max()) == 0.0


def test_kernels_reject_mismatched_planes() -> None:
    from phanes_kernels.maps_triton import compose_triton

    with pytest.raises(ValueError, match="planes of one shape"):
        compose_triton(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(1, 1, 8, 8))

