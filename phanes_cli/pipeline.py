"""The PHANES inference core, the one data flow every command uses.

volume -> slices -> stage 1 (x_cph) -> mask (Eq. 3) -> stage 2 (x_ph) -> anomaly map (Eq. 4)
       -> back to the volume grid -> lesion mask and statistics.

`run_slices` is the batched slice-level core (method.md); `run_volume` wraps it for one volume.
Pre- and post-processing go through `phanes_cli.ops`, the single dispatch point for batched kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from phanes_cli import ops
from phanes_cli.backends import Backend
from phanes_cli.config import MaskConfig, PhanesConfig
from phanes_cli.preprocess import PreparedVolume, restore_volume


@dataclass(frozen=True)
class Calibration:
    """Thresholds learnt on healthy validation slices (paper: 99th percentiles)."""

    mask_threshold: float  # binarises the stage 1 map m(x) into the inpainting mask
    anomaly_threshold: float  # binarises the final map s(x) into the lesion mask
    n_slices: int = 0
    n_volumes: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return {"mask_threshold": self.mask_threshold, "anomaly_threshold": self.anomaly_threshold,
                "n_slices": self.n_slices, "n_volumes": self.n_volumes}


@dataclass(frozen=True)
class SliceMaps:
    """Every intermediate of the pipeline for a batch; all (N, 1, S, S) float32."""

    x: Tensor
    x_cph: Tensor  # coarse pseudo-healthy reconstruction (stage 1)
    ra_map: Tensor  # continuous stage 1 anomaly map m(x), inside the brain (the RA method's map)
    mask: Tensor  # binary, dilated inpainting mask
    x_ph: Tensor  # pseudo-healthy image
    anomaly: Tensor  # final anomaly map s(x), inside the mask and the brain


def stage1_map(x: Tensor, x_cph: Tensor, brain: Tensor, backend: Backend, cfg: MaskConfig) -> Tensor:
    """m(x) = norm95(|eq(x_cph) - eq(x)|) * S_lpips(eq(x_cph), eq(x)), LPIPS smoothed, restricted to the brain."""
    eq_x = ops.clahe(x, cfg)
    eq_rec = ops.clahe(x_cph, cfg)
    residual = ops.norm_percentile((eq_rec - eq_x).abs() * brain, cfg.norm_percentile, where=brain > 0)
    perceptual = ops.gaussian_blur(backend.lpips(eq_rec, eq_x), cfg.lpips_sigma)
    return residual * perceptual * brain


def binary_mask(ra_map: Tensor, brain: Tensor, threshold: float, cfg: MaskConfig) -> Tensor:
    """Threshold m(x) (calibrated, or per image when configured), dilate per image, keep it inside the brain."""
    if cfg.per_image_percentile is not None:
        level = ops.percentile_per_image(ra_map, cfg.per_image_percentile, where=brain > 0)
    else:
        level = torch.full((ra_map.shape[0], 1, 1, 1), float(threshold), device=ra_map.device)
    raw = ((ra_map > level) & (brain > 0)).float()
    return ops.dilate_mask(raw, cfg.dilation_sigma, cfg.dilation_threshold) * brain


def inpaint(x: Tensor, mask: Tensor, backend: Backend) -> Tensor:
    """x_ph = x * (1 - m) + G(x * (1 - m) + m, m) * m."""
    completed = backend.inpaint(x * (1 - mask) + mask, mask)
    return x * (1 - mask) + completed * mask


def anomaly_map(x: Tensor, x_ph: Tensor, mask: Tensor, brain: Tensor, backend: Backend) -> Tensor:
    """s(x) = |x_ph - x| * S_lpips(x_ph, x), zero outside the mask and the brain."""
    return (x_ph - x).abs() * backend.lpips(x_ph, x) * mask * brain


def run_slices(
    x: Tensor,
    brain: Tensor,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    given_mask: Tensor | None = None,
) -> SliceMaps:
    """The PHANES core on one batch: (N, 1, S, S) slices and brain masks in, every map out.

    `given_mask` replaces the stage 1 mask (PHANES-GT: inpaint the ground truth, the upper bound).
    """
    dev = backend.device
    x = x.to(dev, torch.float32)
    brain = brain.to(dev, torch.float32)
    x_cph = backend.reconstruct(x)
    ra_map = stage1_map(x, x_cph, brain, backend, cfg.mask)
    if given_mask is None:
        mask = binary_mask(ra_map, brain, calibration.mask_threshold, cfg.mask)
    else:
        mask = (given_mask.to(dev) > 0.5).float() * brain
    x_ph = inpaint(x, mask, backend)
    return SliceMaps(x=x, x_cph=x_cph, ra_map=ra_map, mask=mask, x_ph=x_ph,
                     anomaly=anomaly_map(x, x_ph, mask, brain, backend))


def lesion_mask(anomaly: np.ndarray, brain: np.ndarray, threshold: float) -> np.ndarray:
    """The binary lesion mask: s(x) >= the calibrated threshold, where s(x) > 0, inside the brain."""
    return (anomaly >= threshold) & (anomaly > 0) & np.asarray(brain, dtype=bool)


@dataclass(frozen=True)
class VolumeMaps:
    """Pipeline results on the native RAS+ voxel grid of one volume, (X, Y, Z) each."""

    anomaly: np.ndarray  # float32 s(x)
    ra_map: np.ndarray  # float32 m(x), the stage 1 map
    pseudo_healthy: np.ndarray  # float32 in [0, 1] (multiply by the volume's scale for input intensities)
    inpaint_mask: np.ndarray  # bool, the stage 1 mask that was inpainted
    lesion_mask: np.ndarray  # bool, s(x) >= anomaly threshold inside the brain
    slices_processed: int


def run_volume(
    prepared: PreparedVolume,
    brain: np.ndarray,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    batch_size: int = 32,
    given_mask: Tensor | None = None,
) -> VolumeMaps:
    """Run every selected slice of a volume in batches and map the results back onto its grid.

    `brain` is the (X, Y, Z) bool brain mask on the same grid; maps are zero outside it.
    """
    outputs: dict[str, list[Tensor]] = {"anomaly": [], "ra_map": [], "x_ph": [], "mask": []}
    n = prepared.slices.shape[0]
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        gt = None if given_mask is None else given_mask[part]
        maps = run_slices(prepared.slices[part], prepared.brain[part], backend, cfg, calibration, gt)
        for key in outputs:
            value = getattr(maps, key)
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"non-finite values in the {key} map (slices {start}..{start + value.shape[0] - 1})")
            outputs[key].append(value.cpu())
    stacked = {k: torch.cat(v) if v else torch.zeros(0, 1, cfg.preprocess.image_size, cfg.preprocess.image_size)
               for k, v in outputs.items()}
    geom = prepared.geometry
    anomaly = np.clip(restore_volume(stacked["anomaly"], geom), 0, None) * brain
    ra_map = np.clip(restore_volume(stacked["ra_map"], geom), 0, None) * brain
    x_ph = restore_volume(stacked["x_ph"], geom)
    inpaint_mask = (restore_volume(stacked["mask"], geom) >= 0.5) & brain
    lesion = lesion_mask(anomaly, brain, calibration.anomaly_threshold)
    return VolumeMaps(anomaly=anomaly.astype(np.float32), ra_map=ra_map.astype(np.float32), pseudo_healthy=x_ph,
                      inpaint_mask=inpaint_mask, lesion_mask=lesion, slices_processed=n)
