"""The PHANES inference core, the one data flow every command uses.

volume -> slices -> stage 1 (x_cph) -> mask (Eq. 3) -> stage 2 (x_ph) -> anomaly map (Eq. 4)
       -> back to the volume grid -> lesion mask.

`run_slices` is the batch-level core (method.md). `infer_slices` runs it over a volume's slices (model
grid, numpy out) and `restore_maps` brings those maps onto the volume grid; `run_volume` composes them.
Screening, evaluation and the tests all take this road.
Pre- and post-processing go through `phanes_cli.ops`, the single dispatch point for batched kernels.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from phanes_cli import ops
from phanes_cli.config import MaskConfig, PhanesConfig
from phanes_cli.preprocess import SliceGeometry, prepare_volume, restore_volume

if TYPE_CHECKING:  # the networks' modules import lpips and torchvision, which the CPU stages do not need
    from phanes_cli.backends import Backend


@dataclass(frozen=True)
class Calibration:
    """Thresholds learnt on validation data: healthy 99th percentiles (paper), or tuned on validation lesions."""

    mask_threshold: float  # binarises the stage 1 map m(x) into the inpainting mask
    anomaly_threshold: float  # binarises the final map s(x) into the lesion mask
    n_slices: int = 0
    n_volumes: int = 0
    min_lesion_ml: float = 0.0  # predicted lesion components smaller than this are dropped (`drop_small_lesions`)
    tuning: dict[str, Any] | None = None  # `calibrate --tune`: the choice and its validation figures

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mask_threshold": self.mask_threshold, "anomaly_threshold": self.anomaly_threshold,
                               "n_slices": self.n_slices, "n_volumes": self.n_volumes}
        if self.min_lesion_ml or self.tuning is not None:
            out.update(min_lesion_ml=self.min_lesion_ml, tuning=self.tuning)
        return out


def drop_small_lesions(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """The mask without its connected components (full connectivity) smaller than `min_ml` millilitres."""
    if min_ml <= 0 or not mask.any():
        return mask
    from phanes_cli.evaluation.lesions import label_components  # here: evaluation imports this module

    labels, n = label_components(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes * voxel_ml >= min_ml
    keep[0] = False
    return keep[labels]


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
    """m(x) = norm95(|eq(x_cph) - eq(x)|) * S_lpips(eq(x_cph), eq(x)), LPIPS smoothed, restricted to the brain
    (less `cfg.edge_margin_px` pixels of its boundary)."""
    eq_x, eq_rec = ops.clahe(x, cfg), ops.clahe(x_cph, cfg)
    ra_map = ops.stage1_map(eq_x, eq_rec, backend.lpips(eq_rec, eq_x), brain, cfg)
    return ra_map if cfg.edge_margin_px == 0 else ra_map * ops.erode(brain, cfg.edge_margin_px)


def binary_mask(ra_map: Tensor, brain: Tensor, threshold: float, cfg: MaskConfig) -> Tensor:
    """Threshold m(x) (calibrated, or per image when configured), dilate per image, keep it inside the brain."""
    return ops.binary_mask(ra_map, brain, threshold, cfg)


def inpaint(x: Tensor, mask: Tensor, backend: Backend) -> Tensor:
    """x_ph = x * (1 - m) + G(x * (1 - m) + m, m) * m."""
    return ops.compose(x, backend.inpaint(x * (1 - mask) + mask, mask), mask)


def anomaly_map(x: Tensor, x_ph: Tensor, mask: Tensor, brain: Tensor, backend: Backend) -> Tensor:
    """s(x) = |x_ph - x| * S_lpips(x_ph, x), zero outside the mask and the brain.

    The lesion threshold is applied on the volume grid (`restore_maps`), so the model-grid mask of
    `ops.final_step` is not used here; an infinite threshold keeps that branch trivially empty.
    """
    anomaly, _ = ops.final_step(x, x_ph, backend.lpips(x_ph, x), mask, brain, float("inf"))
    return anomaly


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


def threshold_lesions(anomaly: np.ndarray, brain: np.ndarray, threshold: float) -> np.ndarray:
    """The binary lesion mask: s(x) >= the calibrated threshold, where s(x) > 0, inside the brain."""
    return (anomaly >= threshold) & (anomaly > 0) & np.asarray(brain, dtype=bool)


def predict_lesions(anomaly: np.ndarray, brain: np.ndarray, calibration: Calibration, voxel_ml: float) -> np.ndarray:
    """The lesion mask of a volume-grid map: `threshold_lesions`, then `drop_small_lesions` (the one rule)."""
    mask = threshold_lesions(anomaly, brain, calibration.anomaly_threshold)
    return drop_small_lesions(mask, calibration.min_lesion_ml, voxel_ml)


# Readable names of the maps `infer_slices` can keep (SliceMaps fields), for its error messages.
_MAP_NAMES = {"anomaly": "anomaly", "ra_map": "stage 1", "x_cph": "reconstruction", "x_ph": "pseudo-healthy",
              "mask": "inpainting mask"}


@dataclass(frozen=True)
class ModelMaps:
    """Model-grid maps of one volume's processed slices as numpy, (N, 1, S, S) each; None where not kept.

    numpy so screening's inference actor can hand them to the CPU write task through Ray's object store.
    """

    anomaly: np.ndarray  # float32 s(x)
    ra_map: np.ndarray | None = None  # float32 m(x)
    x_cph: np.ndarray | None = None  # float32 stage 1 reconstruction
    x_ph: np.ndarray | None = None  # float32 pseudo-healthy image in [0, 1]
    mask: np.ndarray | None = None  # bool inpainting mask


def infer_slices(
    slices: Tensor | np.ndarray,
    brain: Tensor | np.ndarray,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    batch_size: int,
    keep: Collection[str] = (),
    given_mask: Tensor | np.ndarray | None = None,
) -> ModelMaps:
    """`run_slices` over a volume's slices, `batch_size` at a time; s(x) and the `keep` maps come back as numpy.

    keep: SliceMaps fields besides the anomaly map ("ra_map", "x_cph", "x_ph", "mask"); "x_ph" brings "mask"
    along, because the pseudo-healthy image is only taken inside it. A non-finite value in a kept map is a
    FloatingPointError naming the map and the slices: a broken network fails the volume, never writes NaNs.
    """
    unknown = set(keep) - set(_MAP_NAMES)
    if unknown:
        raise ValueError(f"unknown model map(s) {sorted(unknown)}; choose from {sorted(_MAP_NAMES)}")
    names = ["anomaly", *sorted(set(keep) - {"anomaly"} | ({"mask"} if "x_ph" in keep else set()))]
    x, b = torch.as_tensor(slices), torch.as_tensor(brain)
    gt = None if given_mask is None else torch.as_tensor(given_mask)
    n = x.shape[0]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        out = run_slices(x[part], b[part], backend, cfg, calibration, None if gt is None else gt[part])
        for name in names:
            value: Tensor = getattr(out, name)
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"non-finite values in the {_MAP_NAMES[name]} map "
                                         f"(slices {start}..{start + value.shape[0] - 1} of {n})")
            parts[name].append(value.float().cpu().numpy())
    arrays = {k: np.concatenate(v) if v else np.zeros((0, *x.shape[1:]), dtype=np.float32) for k, v in parts.items()}
    if "mask" in arrays:
        arrays["mask"] = arrays["mask"] > 0.5
    return ModelMaps(**arrays)


@dataclass(frozen=True)
class VolumeMaps:
    """Pipeline results on the native RAS+ voxel grid of one volume, (X, Y, Z) each; None where not kept."""

    anomaly: np.ndarray  # float32 s(x), zero outside the brain
    predicted_lesions: np.ndarray  # bool, s(x) >= anomaly threshold inside the brain
    ra_map: np.ndarray | None  # float32 m(x), the stage 1 map, zero outside the brain
    pseudo_healthy: np.ndarray | None  # float32 at the input's intensities
    inpaint_mask: np.ndarray | None  # bool, the mask that was inpainted
    slices_processed: int


def restore_score(model_map: np.ndarray, geometry: SliceGeometry, brain: np.ndarray) -> np.ndarray:
    """A continuous model-grid map on the volume grid: resampled back, clipped at 0, zero outside the brain."""
    return (np.clip(restore_volume(torch.from_numpy(model_map), geometry), 0, None) * brain).astype(np.float32)


def restore_mask(model_mask: np.ndarray, geometry: SliceGeometry, brain: np.ndarray) -> np.ndarray:
    """A binary model-grid mask on the volume grid: its resampled 0.5 level set inside the brain."""
    return (restore_volume(torch.from_numpy(model_mask.astype(np.float32)), geometry) >= 0.5) & brain


def restore_maps(maps: ModelMaps, geometry: SliceGeometry, brain: np.ndarray, scale: float, volume_data: np.ndarray,
                 calibration: Calibration, voxel_ml: float | None = None) -> VolumeMaps:
    """Bring one volume's model-grid maps back onto its grid (`brain`, `volume_data`: (X, Y, Z)) and threshold lesions.

    `voxel_ml` (the volume's voxel volume in mL) lets `predict_lesions` drop components under the calibration's
    `min_lesion_ml`; without it no component is dropped.

    The pseudo-healthy image keeps the input intensities everywhere except inside the restored inpainting
    mask, where it takes x_ph times the volume's intensity scale: x_ph equals x outside the mask by
    definition, and this avoids resampling blur there.
    """
    anomaly = restore_score(maps.anomaly, geometry, brain)
    inpainted = None if maps.mask is None else restore_mask(maps.mask, geometry, brain)
    pseudo = None
    if maps.x_ph is not None and inpainted is not None:
        x_ph = restore_volume(torch.from_numpy(maps.x_ph), geometry) * np.float32(scale)
        pseudo = np.where(inpainted, x_ph, volume_data).astype(np.float32)
    lesions = (threshold_lesions(anomaly, brain, calibration.anomaly_threshold) if voxel_ml is None
               else predict_lesions(anomaly, brain, calibration, voxel_ml))
    return VolumeMaps(anomaly=anomaly, predicted_lesions=lesions,
                      ra_map=None if maps.ra_map is None else restore_score(maps.ra_map, geometry, brain),
                      pseudo_healthy=pseudo, inpaint_mask=inpainted, slices_processed=geometry.n_slices)


def run_volume(
    data: np.ndarray,
    brain: np.ndarray,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    batch_size: int = 32,
    keep: Collection[str] = ("ra_map", "x_ph", "mask"),
    voxel_ml: float | None = None,
) -> VolumeMaps:
    """One volume end to end: (X, Y, Z) RAS+ intensities and brain mask -> maps on the same grid.

    The composition of `prepare_volume`, `infer_slices` and `restore_maps`; screening runs the same two
    halves in separate processes (inference actor, CPU write task). Give `voxel_ml` (`Volume.voxel_ml`) to
    drop lesion components under the calibration's minimum size, as screening does.
    """
    prepared = prepare_volume(data, brain, cfg.preprocess)
    maps = infer_slices(prepared.slices, prepared.brain, backend, cfg, calibration, batch_size, keep)
    return restore_maps(maps, prepared.geometry, brain, prepared.scale, data, calibration, voxel_ml)
