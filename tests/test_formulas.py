"""The paper's formulas (Eq. 3, the binary mask, Eq. 4) against plain numpy / scipy / skimage oracles.

Each oracle re-states method.md without the code under test; only the networks (stage 1 decoder,
stage 2 generator, LPIPS) are taken from a real backend, because they are networks, not formulas.
Images are axial slices of the MNI152 template (nilearn's, shipped with phanes) plus random
images, on small untrained networks. Mutant tests switch one step off and show the oracles notice.
The end-to-end test screens a tiny volume through `phanes screen`'s engine on the session's Ray head node and
checks the written files with nibabel only.

Gaussian filters: `ops.gaussian_blur` documents scipy's mode 'reflect' (d c b a | a b c d, the edge
sample repeated) with truncate 4, which is scipy.ndimage.gaussian_filter's default; the oracles name
mode="reflect" explicitly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import ndimage
from skimage.exposure import equalize_adapthist

from phanes_cli.config import AOTConfig, MaskConfig, PhanesConfig, PreprocessConfig, RAConfig
from phanes_cli.core import ops
from phanes_cli.core.bundle import load_bundle, save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.ops import binary_mask
from phanes_cli.core.pipeline import anomaly_map, inpaint, run_slices, stage1_map
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.infra.packaged_data import mni152_image
from phanes_cli.models import AOTGenerator, SoftIntroVAE
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend, load_networks
from phanes_cli.screening.engine import EXIT_OK, screen
from phanes_cli.screening.options import ScreenOptions
from tests._ray import HEAD_IP, RayCluster

SIZE = 64
ONE_MM = (1.0, 1.0, 1.0)
TOL = 1e-4  # oracle vs code, measured ~2e-7 (float32 rounding); every mutant below misses by 3e-2 or more
Slices = tuple[np.ndarray, np.ndarray]  # (x, brain), (N, 1, SIZE, SIZE) float32


def small_config() -> PhanesConfig:
    return PhanesConfig(name="formulas", ra=RAConfig(channels=(8, 8, 16, 16, 16), latent_dim=16),
                        aot=AOTConfig(base_channels=8, channels=16, blocks=1, rates=(1, 2), disc_channels=(8, 8, 8, 8)),
                        preprocess=PreprocessConfig(image_size=SIZE, min_brain_fraction=0.2))


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    torch.manual_seed(3)
    return TorchBackend(PhanesNetworks(small_config()), torch.device("cpu"))


def template() -> np.ndarray:
    """The MNI152 T1 template (2 mm), scaled to [0, 1] by its maximum."""
    data = np.asarray(mni152_image("t1_2mm").get_fdata(), dtype=np.float64)
    return data / data.max()


def make_slices() -> Slices:
    """(x, brain), (N, 1, 64, 64) float32: three template slices (p98-scaled, padded, resized) and two random images."""
    volume = template()
    images, brains = [], []
    for z in (30, 42, 55):
        axial = volume[:, :, z]
        side = max(axial.shape)
        square = np.zeros((side, side))
        square[:axial.shape[0], :axial.shape[1]] = axial
        square = ndimage.zoom(square, SIZE / side, order=1)[:SIZE, :SIZE]
        brain = square > 0.1 * square.max()
        images.append(np.clip(square / np.percentile(square[brain], 98), 0, 1) * brain)
        brains.append(brain)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - 31.5) ** 2 + (xx - 30) ** 2 < 27**2
    for smooth in (0.0, 2.0):
        noise = ndimage.gaussian_filter(rng.random((SIZE, SIZE)), smooth) if smooth else rng.random((SIZE, SIZE))
        images.append(np.clip(noise / noise.max(), 0, 1) * disc)
        brains.append(disc)
    return np.stack(images)[:, None].astype(np.float32), np.stack(brains)[:, None].astype(np.float32)


@pytest.fixture(scope="module")
def slices() -> Slices:
    return make_slices()


def coarse_reconstruction(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_cph, lesioned x): a stand-in x_cph smoother than x, and x with a bright square the x_cph lacks."""
    rec = np.stack([ndimage.gaussian_filter(i[0], 1.0) for i in x])[:, None]
    lesioned = x.copy()
    lesioned[:, :, 28:36, 22:30] = np.clip(lesioned[:, :, 28:36, 22:30] + 0.6, 0, 1)
    return rec.astype(np.float32), lesioned.astype(np.float32)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def lpips_np(backend: TorchBackend, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The network part of the oracles: the backend's spatial LPIPS map of two image batches."""
    return backend.lpips(t(a), t(b)).numpy().astype(np.float64)


# ---------------------------------------------------------------- oracles (method.md, in numpy)

def eq3_oracle(x: np.ndarray, x_cph: np.ndarray, brain: np.ndarray, backend: TorchBackend,
               cfg: MaskConfig) -> np.ndarray:
    """m(x) = norm95(|eq(x_cph) - eq(x)|) * gaussian(S_lpips(eq(x_cph), eq(x)), sigma), inside the brain."""
    def eq(batch: np.ndarray) -> np.ndarray:
        # float32 in, as the pipeline's tensors: on a near-flat image (an untrained decoder's x_cph) skimage's
        # 14-bit stretch rounds float64 copies of the same values differently.
        return np.stack([equalize_adapthist(img[0].astype(np.float32), kernel_size=img.shape[-1] // cfg.clahe_tiles,
                                            clip_limit=cfg.clahe_clip, nbins=cfg.clahe_bins) for img in batch])[:, None]

    eq_x, eq_rec = eq(x), eq(x_cph)
    perceptual = lpips_np(backend, eq_rec, eq_x)
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(x.shape[0]):
        inside = brain[i, 0] > 0
        residual = np.abs(eq_rec[i, 0] - eq_x[i, 0]) * inside
        level = max(np.percentile(residual[inside], cfg.norm_percentile), 1e-8)
        smooth = ndimage.gaussian_filter(perceptual[i, 0], cfg.lpips_sigma, mode="reflect", truncate=4.0)
        out[i, 0] = np.clip(residual / level, 0, 1) * smooth * inside
    return out


def mask_oracle(ra_map: np.ndarray, brain: np.ndarray, threshold: float, cfg: MaskConfig) -> np.ndarray:
    """(m > threshold) inside the brain, dilated image by image (Gaussian sigma 1.2, > 0.1), inside the brain."""
    out = np.zeros(ra_map.shape, dtype=np.float64)
    for i in range(ra_map.shape[0]):
        inside = brain[i, 0] > 0
        raw = ((ra_map[i, 0] > threshold) & inside).astype(np.float64)
        grown = ndimage.gaussian_filter(raw, cfg.dilation_sigma, mode="reflect") > cfg.dilation_threshold
        out[i, 0] = grown & inside
    return out


def eq4_oracle(x: np.ndarray, mask: np.ndarray, brain: np.ndarray,
               backend: TorchBackend) -> tuple[np.ndarray, np.ndarray]:
    """x_ph = x(1-m) + G(x(1-m)+m, m) m and s = |x_ph - x| * S_lpips(x_ph, x) * mask * brain."""
    x64, m = x.astype(np.float64), mask.astype(np.float64)
    completed = backend.inpaint(t(x64 * (1 - m) + m), t(m)).numpy().astype(np.float64)
    x_ph = x64 * (1 - m) + completed * m
    return x_ph, np.abs(x_ph - x64) * lpips_np(backend, x_ph, x64) * m * brain


def separating_threshold(values: np.ndarray, q: float) -> float:
    """A level near the q-th percentile that sits in a gap much wider than TOL (no ties flip across it)."""
    ordered = np.unique(values)
    start = int(len(ordered) * q / 100)
    for k in range(start, len(ordered) - 1):
        if ordered[k + 1] - ordered[k] > 20 * TOL:
            return float((ordered[k] + ordered[k + 1]) / 2)
    raise AssertionError("no gap in the map to place a threshold")


# ---------------------------------------------------------------- Eq. 3: the stage 1 map

def check_stage1(backend: TorchBackend, x: np.ndarray, brain: np.ndarray) -> float:
    """Compare `stage1_map` with the oracle; returns the largest difference, the caller asserts on it."""
    cfg = small_config().mask
    x_cph, lesioned = coarse_reconstruction(x)
    ours = stage1_map(t(lesioned), t(x_cph), t(brain), backend, cfg).numpy()
    expected = eq3_oracle(lesioned, x_cph, brain, backend, cfg)
    assert expected.max() > 0.05 and (expected[brain == 0] == 0).all() and (ours[brain == 0] == 0).all()
    return float(np.abs(ours - expected).max())


def test_stage1_map_matches_numpy_eq3(backend: TorchBackend, slices: Slices, one_thread: None) -> None:
    x, brain = slices
    assert check_stage1(backend, x, brain) < TOL


@pytest.mark.parametrize("mutant", ["no LPIPS smoothing", "LPIPS smoothing at sigma 1", "no CLAHE", "no norm95",
                                    "norm95 over the whole image"])
def test_stage1_oracle_catches_a_broken_formula(mutant: str, backend: TorchBackend, slices: Slices,
                                                monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """The Eq. 3 check bites: each step removed from the code (through `ops`) is seen by the oracle."""
    if mutant == "no LPIPS smoothing":
        monkeypatch.setattr(ops, "gaussian_blur", lambda x, sigma: x.clone())
    elif mutant == "LPIPS smoothing at sigma 1":
        blur = ops.gaussian_blur
        monkeypatch.setattr(ops, "gaussian_blur", lambda x, sigma: blur(x, 1.0))
    elif mutant == "no CLAHE":
        monkeypatch.setattr(ops, "clahe", lambda x, cfg: x.clone())
    elif mutant == "no norm95":
        monkeypatch.setattr(ops, "norm_percentile", lambda x, q=95.0, where=None: x.clamp(0, 1))
    else:
        original = ops.norm_percentile
        monkeypatch.setattr(ops, "norm_percentile", lambda x, q=95.0, where=None: original(x, q, None))
    x, brain = slices
    assert check_stage1(backend, x, brain) > 20 * TOL


@pytest.mark.parametrize("margin", [1, 2, 4])
def test_edge_margin_zeroes_the_stage1_map_near_the_brain_boundary(margin: int, backend: TorchBackend,
                                                                   slices: Slices, one_thread: None) -> None:
    """`mask.edge_margin_px` = Eq. 3 times the brain eroded by a (2k+1)-pixel square, per image (scipy oracle)."""
    x, brain = slices
    x_cph, lesioned = coarse_reconstruction(x)
    cfg = replace(small_config().mask, edge_margin_px=margin)
    ours = stage1_map(t(lesioned), t(x_cph), t(brain), backend, cfg).numpy()
    square = np.ones((2 * margin + 1, 2 * margin + 1), dtype=bool)
    inner = np.stack([ndimage.binary_erosion(b[0] > 0, square, border_value=1) for b in brain])[:, None]
    assert 0 < inner.sum() < (brain > 0).sum()
    expected = eq3_oracle(lesioned, x_cph, brain, backend, cfg) * inner
    assert (ours[~inner] == 0).all()
    assert np.abs(ours - expected).max() < TOL


# ---------------------------------------------------------------- the binary inpainting mask

def test_binary_mask_matches_scipy_per_image(backend: TorchBackend, slices: Slices) -> None:
    x, brain = slices
    cfg = small_config().mask
    x_cph, lesioned = coarse_reconstruction(x)
    ra = eq3_oracle(lesioned, x_cph, brain, backend, cfg)
    threshold = separating_threshold(ra[brain > 0], 90)
    ours = binary_mask(t(ra), t(brain), threshold, cfg).numpy()
    expected = mask_oracle(ra, brain, threshold, cfg)
    np.testing.assert_array_equal(ours, expected)
    raw = (ra > threshold) & (brain > 0)
    assert raw.sum() < expected.sum() < 0.6 * (brain > 0).sum()  # the dilation grew it, the brain bounds it


def test_binary_mask_does_not_leak_between_images() -> None:
    """Image 1 has nothing above threshold: a batch-wide filter (the reference code's) would mark it."""
    cfg = small_config().mask
    ra = np.zeros((3, 1, SIZE, SIZE), dtype=np.float32)
    ra[0, 0, 20:26, 20:26] = 0.9
    ra[2, 0, 40:44, 10:13] = 0.9
    ra[2, 0, 41, 11] = 0.2
    brain = np.ones_like(ra)
    brain[2, 0, :, 12:] = 0  # image 2's mask is cut at the brain edge
    ours = binary_mask(t(ra), t(brain), 0.5, cfg).numpy()
    np.testing.assert_array_equal(ours, mask_oracle(ra, brain, 0.5, cfg))
    assert ours[1].sum() == 0 and ours[0].sum() > 36 and ours[2, 0, :, 12:].sum() == 0
    raw = ((ra > 0.5) & (brain > 0))[:, 0].astype(np.float64)
    batch_filtered = ndimage.gaussian_filter(raw, cfg.dilation_sigma) > cfg.dilation_threshold
    assert batch_filtered[1].any()  # the wrong rule really leaks here: the assertion above can fail


def test_binary_mask_per_image_percentile_option(slices: Slices) -> None:
    """The reference-code option: each image's own percentile (inside the brain) replaces the calibrated level."""
    x, brain = slices
    cfg = MaskConfig(per_image_percentile=90.0)
    ra = np.stack([ndimage.gaussian_filter(i[0], 3.0) for i in x])[:, None] * brain
    ours = binary_mask(t(ra), t(brain), 123.0, cfg).numpy()
    for i in range(x.shape[0]):
        level = np.percentile(ra[i, 0][brain[i, 0] > 0], 90.0)
        np.testing.assert_array_equal(ours[i:i + 1], mask_oracle(ra[i:i + 1], brain[i:i + 1], level, cfg))


# ---------------------------------------------------------------- Eq. 4: pseudo-healthy image and anomaly map

def test_inpaint_and_anomaly_map_match_eq4(backend: TorchBackend, slices: Slices, one_thread: None) -> None:
    x, brain = slices
    rng = np.random.default_rng(1)
    blobs = ndimage.gaussian_filter(rng.random(x.shape[2:]), 3.0) > 0.52
    mask = (blobs[None, None] * brain).astype(np.float32)
    assert 0 < mask.sum() < brain.sum()
    x_ph = inpaint(t(x), t(mask), backend).numpy()
    s = anomaly_map(t(x), t(x_ph), t(mask), t(brain), backend).numpy()
    expected_ph, expected_s = eq4_oracle(x, mask, brain, backend)
    np.testing.assert_allclose(x_ph, expected_ph, atol=TOL)
    np.testing.assert_allclose(s, expected_s, atol=TOL)
    assert (x_ph[mask == 0] == x[mask == 0]).all() and (s[(mask == 0) | (brain == 0)] == 0).all()
    # The paper's literal G(x(1-m), m) (holes left at 0, not 1) gives another image: the check can tell them apart.
    holes_at_zero = backend.inpaint(t(x * (1 - mask)), t(mask)).numpy()
    assert np.abs(x * (1 - mask) + holes_at_zero * mask - x_ph).max() > 20 * TOL


def test_run_slices_composes_eq3_mask_and_eq4(backend: TorchBackend, slices: Slices, one_thread: None) -> None:
    """Every map of the batched core against the oracles chained together (x_cph from the real decoder)."""
    x, brain = slices
    cfg = small_config()
    x_cph = backend.reconstruct(t(x)).numpy()
    ra = eq3_oracle(x, x_cph, brain, backend, cfg.mask)
    threshold = separating_threshold(ra[brain > 0], 90)
    maps = run_slices(t(x), t(brain), backend, cfg, threshold)
    np.testing.assert_array_equal(maps.x_cph.numpy(), x_cph)
    np.testing.assert_allclose(maps.stage1_map.numpy(), ra, atol=TOL)
    mask = mask_oracle(ra, brain, threshold, cfg.mask)
    np.testing.assert_array_equal(maps.inpaint_mask.numpy(), mask)
    assert 0 < mask.sum() < 0.6 * brain.sum()
    x_ph, s = eq4_oracle(x, mask, brain, backend)
    np.testing.assert_allclose(maps.x_ph.numpy(), x_ph, atol=TOL)
    np.testing.assert_allclose(maps.anomaly.numpy(), s, atol=TOL)


def test_run_slices_without_smoothing_misses_the_oracle(backend: TorchBackend, slices: Slices,
                                                        monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    x, brain = slices
    cfg = small_config()
    x_cph = backend.reconstruct(t(x)).numpy()
    ra = eq3_oracle(x, x_cph, brain, backend, cfg.mask)
    monkeypatch.setattr(ops, "gaussian_blur", lambda x, sigma: x.clone())
    maps = run_slices(t(x), t(brain), backend, cfg, 1.0)
    assert np.abs(maps.stage1_map.numpy() - ra).max() > 20 * TOL


# ---------------------------------------------------------------- end to end: the files `phanes screen` writes

def make_bundle(folder: Path, image: np.ndarray, brain: np.ndarray,
                zooms: tuple[float, float, float] = ONE_MM) -> Path:
    """Untrained small networks; thresholds chosen so ~10% of the brain is inpainted and some voxels are lesions."""
    torch.manual_seed(0)
    cfg = small_config()
    save_bundle(folder, cfg, SoftIntroVAE(cfg.ra, cfg.preprocess.image_size), AOTGenerator(cfg.aot))
    backend = TorchBackend(load_networks(load_bundle(folder, require_calibration=False)), torch.device("cpu"))
    prepared = prepare_volume(image, brain, cfg.preprocess, zooms)
    first = run_slices(prepared.slices, prepared.brain, backend, cfg, float("inf"))
    mask_threshold = float(torch.quantile(first.stage1_map[prepared.brain > 0], 0.9))
    second = run_slices(prepared.slices, prepared.brain, backend, cfg, mask_threshold)
    anomaly_threshold = float(torch.quantile(second.anomaly[second.anomaly > 0], 0.8))
    nets = backend.networks
    save_bundle(folder, cfg, nets.ra, nets.generator, Calibration(mask_threshold, anomaly_threshold))
    return folder


@pytest.fixture(scope="module")
def screened(ray_head: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """One real screen (on the session's Ray head node) of one volume: input intensities x1000, LPS anisotropic grid."""
    root = tmp_path_factory.mktemp("screen")
    base = ndimage.zoom(template(), 0.5, order=1)[4:-4, 4:-4, 6:-8]
    brain = base > 0.1 * base.max()
    data = (base * brain * 1000.0).astype(np.float32)
    affine = np.diag([-3.0, 3.5, 4.0, 1.0])
    affine[:3, 3] = [60.0, -80.0, -40.0]
    nib.save(nib.Nifti1Image(data, affine), str(root / "sub.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(root / "sub_brain.nii.gz"))
    (root / "list.csv").write_text("id,image,brain_mask\nsub,sub.nii.gz,sub_brain.nii.gz\n")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    canonical_brain = nib.as_closest_canonical(nib.Nifti1Image(brain.astype(np.uint8), affine))
    bundle = make_bundle(root / "bundle", np.asarray(canonical.dataobj), np.asarray(canonical_brain.dataobj) > 0,
                         tuple(float(z) for z in canonical.header.get_zooms()[:3]))  # type: ignore[arg-type]
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # loopback cluster, as the other Ray tests
        summary = screen([str(root / "list.csv")],
                         ScreenOptions(bundle=bundle, out=out, address=ray_head.address, node_ip=HEAD_IP, quiet=True,
                                       num_actors=1, outputs=frozenset({"anomaly", "lesion_mask", "pseudohealthy"})))
    assert summary.exit_code == EXIT_OK and summary.done == 1
    maps = {kind: np.asarray(nib.nifti1.load(str(out / "maps" / f"sub_{suffix}.nii.gz")).dataobj)
            for kind, suffix in (("pseudohealthy", "pseudohealthy"), ("anomaly", "anomaly"),
                                 ("lesion_mask", "lesionmask"))}
    assert all(m.shape == data.shape for m in maps.values())
    (row,) = pq.read_table(out / "volumes.parquet").to_pylist()
    assert row["id"] == "sub" and row["status"] == "ok" and row["brain_mask_source"] == "file"
    return {"data": data, "brain": brain, "affine": affine, **maps,
            "burden_ml": np.float64(row["lesion_burden_ml"]), "brain_ml": np.float64(row["brain_volume_ml"])}


@pytest.mark.slow
def test_screen_writes_the_pseudo_healthy_image_at_input_intensities(screened: dict[str, np.ndarray]) -> None:
    """The input's voxels outside the inpainted region, which lies inside the brain and is a minority of it;
    inside it, x_ph times the brain's 98th percentile: within [0, p98], far above the model's [0, 1] scale."""
    data, brain, pseudo = screened["data"], screened["brain"], screened["pseudohealthy"]
    changed = pseudo != data
    assert changed.any() and not (changed & ~brain).any() and changed.sum() < 0.5 * brain.sum()
    np.testing.assert_array_equal(pseudo[~brain], data[~brain])
    scale = np.percentile(data[brain & (data > 0)], 98)
    assert scale > 500
    assert pseudo[changed].min() >= 0 and pseudo[changed].max() <= scale * (1 + 1e-5)
    assert np.median(pseudo[changed]) > 0.05 * scale


@pytest.mark.slow
def test_screen_anomaly_map_and_lesion_mask_stay_in_the_brain(screened: dict[str, np.ndarray]) -> None:
    brain, anomaly, lesion = screened["brain"], screened["anomaly"], screened["lesion_mask"].astype(bool)
    assert (anomaly[~brain] == 0).all() and anomaly[brain].max() > 0
    assert lesion.any() and not (lesion & (~brain | (anomaly <= 0))).any()


@pytest.mark.slow
def test_screen_lesion_burden_counts_the_written_mask(screened: dict[str, np.ndarray]) -> None:
    """lesion_burden_ml = nonzero voxels of the written mask x the voxel volume from the affine."""
    voxel_ml = abs(np.linalg.det(screened["affine"][:3, :3])) / 1000.0
    assert screened["burden_ml"] == pytest.approx(np.count_nonzero(screened["lesion_mask"]) * voxel_ml, rel=1e-9)
    assert screened["brain_ml"] == pytest.approx(np.count_nonzero(screened["brain"]) * voxel_ml, rel=1e-9)
