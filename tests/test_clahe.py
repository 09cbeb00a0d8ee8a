"""Batched torch CLAHE against skimage.exposure.equalize_adapthist, the definition the paper's code uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phanes_kernels.clahe import clahe_torch

skimage_exposure = pytest.importorskip("skimage.exposure")
nib = pytest.importorskip("nibabel")

HEALTHY = Path("/work/shared/data/healthy-t1")


def _skimage(img: np.ndarray, tiles: int = 8, clip: float = 0.01, nbins: int = 256) -> np.ndarray:
    return skimage_exposure.equalize_adapthist(img, kernel_size=img.shape[0] // tiles, clip_limit=clip, nbins=nbins)


@pytest.fixture(scope="module")
def mri_slices() -> np.ndarray:
    """Mid-axial and two off-centre slices of each healthy volume, scaled by the 98th percentile, 128 x 128."""
    files = sorted(HEALTHY.glob("*.nii.gz"))
    if not files:
        pytest.skip(f"real MRI test data not available at {HEALTHY}")
    slices = []
    for path in files:
        volume = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(volume.dataobj, dtype=np.float32)
        for offset in (-15, 0, 10):
            axial = data[:, :, data.shape[2] // 2 + offset]
            scale = np.percentile(axial[axial > 0], 98)
            axial = np.clip(axial / scale, 0, 1)
            resized = F.interpolate(torch.from_numpy(axial)[None, None], size=(128, 128), mode="bilinear")
            slices.append(resized[0, 0].clamp(0, 1).numpy())
    return np.stack(slices)


def _random_images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = F.avg_pool2d(torch.from_numpy(rng.random((n, 1, size + 6, size + 6)).astype(np.float32)), 7, stride=1)
    images = np.concatenate([rng.random((n, size, size)).astype(np.float32) ** 2, smooth[:, 0].numpy()])
    images[-1] *= 0.3  # low contrast: the 14-bit stretch matters
    return images


def test_matches_skimage_on_real_mri(mri_slices: np.ndarray) -> None:
    ours = clahe_torch(torch.from_numpy(mri_slices)[:, None])[:, 0].numpy()
    reference = np.stack([_skimage(s) for s in mri_slices])
    diff = np.abs(ours - reference)
    # Measured: identical on every real slice and on float32 noise (mean 0, max 0); the bounds leave room for
    # float rounding.
    assert diff.mean() < 1e-4
    assert diff.max() < 1e-3


def test_matches_skimage_on_random_images() -> None:
    images = _random_images(4, 128, seed=0)
    ours = clahe_torch(torch.from_numpy(images)).numpy()
    diff = np.abs(ours - np.stack([_skimage(i) for i in images]))
    assert diff.mean() < 1e-4
    assert diff.max() < 1e-3


@pytest.mark.parametrize(("size", "clip", "nbins"),
                         [(100, 0.01, 256), (64, 0.05, 128), (128, 0.0, 256), (130, 0.5, 64)])
def test_matches_skimage_other_settings(size: int, clip: float, nbins: int) -> None:
    """Sizes that are not a multiple of the tile (reflected last tiles), no clipping, other bin counts."""
    images = _random_images(2, size, seed=size)
    ours = clahe_torch(torch.from_numpy(images)[:, None], clip_limit=clip, nbins=nbins)[:, 0].numpy()
    diff = np.abs(ours - np.stack([_skimage(i, clip=clip, nbins=nbins) for i in images]))
    assert diff.mean() < 1e-4
    assert diff.max() < 1e-3


def test_batched_equals_per_image(mri_slices: np.ndarray) -> None:
    batch = torch.from_numpy(np.concatenate([mri_slices[:4], _random_images(1, 128, seed=3)]))[:, None]
    together = clahe_torch(batch)
    for i in range(batch.shape[0]):
        assert torch.equal(together[i : i + 1], clahe_torch(batch[i : i + 1]))


def test_shapes_dtype_and_constant_images() -> None:
    x = torch.rand(3, 64, 64, dtype=torch.float64)
    out = clahe_torch(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    flat = torch.stack([torch.zeros(64, 64), torch.full((64, 64), 0.5)])[:, None]
    for image, result in zip(flat[:, 0].numpy(), clahe_torch(flat)[:, 0].numpy(), strict=True):
        np.testing.assert_allclose(result, _skimage(image), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = torch.from_numpy(_random_images(3, 128, seed=7))[:, None]
    torch.testing.assert_close(clahe_torch(x.cuda()).cpu(), clahe_torch(x), atol=1e-6, rtol=0)
