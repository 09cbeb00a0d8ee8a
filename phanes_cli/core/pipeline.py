"""The PHANES inference core: the one data flow every command uses, spelled out here.

volume -> slices (`preprocess.prepare_volume`) -> stage 1 x_cph -> stage 1 map m(x) (Eq. 3) -> inpainting
mask (m > the calibrated mask threshold, dilated) -> stage 2 x_ph -> anomaly map s(x) (Eq. 4)
-> back onto the volume grid (`restore_maps`) -> lesion mask (`core.lesion_rule`) -> statistics
(`core.statistics`).

`run_slices` is the batch-level core (method.md); `infer_slices` runs it over a volume's slices (model grid,
numpy out) and `restore_maps` brings those maps onto the volume grid; `run_volume` composes the three.
Stage 2 and the second LPIPS pass run only on slices whose inpainting mask is not empty (`stage2_maps`): with
m = 0, Eq. 4 gives x_ph = x and s(x) = 0 exactly, so nothing is lost by skipping the others.
Screening runs the same parts in separate processes (decode task, inference actor, write task); evaluation,
calibration and tuning call them in one. Pre- and post-processing go through `core.ops`, the single dispatch
point for batched kernels; the networks run behind `core.backend.Backend`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from phanes_cli.config import MaskConfig, PhanesConfig
from phanes_cli.core import ops
from phanes_cli.core.backend import Backend
from phanes_cli.core.preprocess import SliceGeometry, prepare_volume, restore_volume
from phanes_cli.core.slice_context import context_average


@dataclass(frozen=True)
class SliceMaps:
    """Every intermediate of the pipeline for a batch; all (N, 1, S, S) float32."""

    x: Tensor
    x_cph: Tensor  # coarse pseudo-healthy reconstruction (stage 1)
    stage1_map: Tensor  # continuous stage 1 map m(x), inside the brain (also the RA method's score)
    inpaint_mask: Tensor  # binary, dilated inpainting mask
    x_ph: Tensor  # pseudo-healthy image
    anomaly: Tensor  # final anomaly map s(x), inside the inpainting mask and the brain


def stage1_map(x: Tensor, x_cph: Tensor, brain: Tensor, backend: Backend, cfg: MaskConfig) -> Tensor:
    """m(x) = norm95(|eq(x_cph) - eq(x)|) * S_lpips(eq(x_cph), eq(x)), LPIPS smoothed, restricted to the brain
    (less `cfg.edge_margin_px` pixels of its boundary)."""
    eq_x, eq_rec = ops.clahe(x, cfg), ops.clahe(x_cph, cfg)
    m = ops.stage1_map(eq_x, eq_rec, backend.lpips(eq_rec, eq_x), brain, cfg)
    return m if cfg.edge_margin_px == 0 else m * ops.erode(brain, cfg.edge_margin_px)


def inpaint(x: Tensor, mask: Tensor, backend: Backend) -> Tensor:
    """x_ph = x * (1 - m) + G(x * (1 - m) + m, m) * m."""
    return ops.compose(x, backend.inpaint(x * (1 - mask) + mask, mask), mask)


def anomaly_map(x: Tensor, x_ph: Tensor, mask: Tensor, brain: Tensor, backend: Backend) -> Tensor:
    """s(x) = |x_ph - x| * S_lpips(x_ph, x), zero outside the inpainting mask and the brain."""
    return ops.anomaly_map(x, x_ph, backend.lpips(x_ph, x), mask, brain)


def stage1_masks(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig, mask_threshold: float,
                 given_mask: Tensor | None = None, stage1: tuple[Tensor, Tensor] | None = None,
                 need_stage1: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(x_cph, m(x), inpainting mask) of a batch already on the backend's device.

    With a `given_mask` (PHANES-GT) stage 1 is only run when `need_stage1` (its maps are wanted); then x_cph
    and m are None. `stage1` = (x_cph, m) computed beforehand (slice context: m already averaged).
    """
    x_cph: Tensor | None = None
    m: Tensor | None = None
    if stage1 is not None:
        x_cph, m = (t.to(backend.device, torch.float32) for t in stage1)
    elif given_mask is None or need_stage1:
        x_cph = backend.reconstruct(x)
        m = stage1_map(x, x_cph, brain, backend, cfg.mask)
    if given_mask is not None:
        return x_cph, m, (given_mask.to(backend.device) > 0.5).float() * brain
    assert m is not None
    return x_cph, m, ops.binary_mask(m, brain, mask_threshold, cfg.mask)


def inpainted(mask: Tensor) -> Tensor:
    """(N,) bool: the slices whose inpainting mask is not empty, the only ones stage 2 runs on."""
    return (mask.flatten(1) > 0).any(dim=1)


def stage2_maps(x: Tensor, mask: Tensor, brain: Tensor, backend: Backend) -> tuple[Tensor, Tensor]:
    """(x_ph, s(x)) of a batch; stage 2 and the second LPIPS pass run on the slices with a non-empty mask only.

    With m = 0, Eq. 4 gives x_ph = x and s(x) = 0 exactly (the generator's output is multiplied by 0), so the
    other slices are filled without the networks. A batch of only such slices never calls them.
    """
    active = inpainted(mask)
    if bool(active.all()):
        x_ph = inpaint(x, mask, backend)
        return x_ph, anomaly_map(x, x_ph, mask, brain, backend)
    x_ph, s = x.clone(), torch.zeros_like(x)
    if bool(active.any()):
        idx = active.nonzero().squeeze(1)
        x_ph[idx], s[idx] = stage2_maps(x[idx], mask[idx], brain[idx], backend)
    return x_ph, s


def run_slices(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig, mask_threshold: float,
               given_mask: Tensor | None = None, stage1: tuple[Tensor, Tensor] | None = None) -> SliceMaps:
    """The PHANES core on one batch: (N, 1, S, S) slices and brain masks in, every map out.

    `mask_threshold` binarises m(x) (the calibration's, or a candidate during calibration); `given_mask`
    replaces the stage 1 mask (PHANES-GT: inpaint the ground truth, the upper bound); `stage1` = (x_cph, m)
    computed beforehand (the second pass of `infer_slices` with slice context, m already averaged).
    Slices with an empty inpainting mask skip stage 2 (`stage2_maps`).
    """
    x = x.to(backend.device, torch.float32)
    brain = brain.to(backend.device, torch.float32)
    x_cph, m, mask = stage1_masks(x, brain, backend, cfg, mask_threshold, given_mask, stage1)
    assert x_cph is not None and m is not None
    x_ph, anomaly = stage2_maps(x, mask, brain, backend)
    return SliceMaps(x=x, x_cph=x_cph, stage1_map=m, inpaint_mask=mask, x_ph=x_ph, anomaly=anomaly)


# Readable names of the maps `infer_slices` can keep (SliceMaps fields), for its error messages.
_MAP_NAMES = {"anomaly": "anomaly", "stage1_map": "stage 1", "x_cph": "reconstruction", "x_ph": "pseudo-healthy",
              "inpaint_mask": "inpainting mask"}


@dataclass(frozen=True)
class ModelMaps:
    """Model-grid maps of one volume's processed slices as numpy, (N, 1, S, S) each; None where not kept.

    numpy so screening's inference actor can hand them to the CPU write task through Ray's object store.
    """

    anomaly: np.ndarray  # float32 s(x)
    slices_inpainted: int  # slices with a non-empty inpainting mask: the only ones stage 2 ran on
    stage1_map: np.ndarray | None = None  # float32 m(x)
    x_cph: np.ndarray | None = None  # float32 stage 1 reconstruction
    x_ph: np.ndarray | None = None  # float32 pseudo-healthy image in [0, 1]
    inpaint_mask: np.ndarray | None = None  # bool inpainting mask
    map_scale: float = 1.0  # what s(x) was divided by (`mask.normalise_map`); 1 when off


def infer_slices(
    slices: Tensor | np.ndarray,
    brain: Tensor | np.ndarray,
    backend: Backend,
    cfg: PhanesConfig,
    mask_threshold: float,
    batch_size: int,
    keep: Collection[str] = (),
    given_mask: Tensor | np.ndarray | None = None,
) -> ModelMaps:
    """`run_slices` over a volume's slices, `batch_size` at a time; s(x) and the `keep` maps come back as numpy.

    keep: SliceMaps fields besides the anomaly map ("stage1_map", "x_cph", "x_ph", "inpaint_mask"); "x_ph"
    brings "inpaint_mask" along, because the pseudo-healthy image is only taken inside it. Stage 1 and the masks
    run over every slice; stage 2 and the second LPIPS pass only over the slices with a non-empty inpainting mask,
    gathered into full batches (`stage2_maps`: the others are exact without them). With a `given_mask`, stage 1
    runs only when its maps are kept. A non-finite value in m(x) or a kept map is a FloatingPointError naming the
    map and the slices: a broken network fails the volume, never writes NaNs. With `cfg.mask.slice_context` (and
    no `given_mask`) stage 1 runs first on every slice and m(x) is averaged with the neighbouring slices
    (`core.slice_context`; the slices are one volume's consecutive processed slices); the stage 1 map returned
    is the averaged one it binarised. With `cfg.mask.normalise_map` (and no `given_mask`) s(x) is divided by the
    volume's `volume_scale`, recorded as `map_scale`.
    """
    unknown = set(keep) - set(_MAP_NAMES)
    if unknown:
        raise ValueError(f"unknown model map(s) {sorted(unknown)}; choose from {sorted(_MAP_NAMES)}")
    names = ["anomaly", *sorted(set(keep) - {"anomaly"} | ({"inpaint_mask"} if "x_ph" in keep else set()))]
    dev = backend.device
    x, b = torch.as_tensor(slices).to(dev, torch.float32), torch.as_tensor(brain).to(dev, torch.float32)
    gt = None if given_mask is None else torch.as_tensor(given_mask)
    first = _context_stage1(x, b, backend, cfg, batch_size) if cfg.mask.slice_context and gt is None else None
    maps = _mask_pass(x, b, backend, cfg, mask_threshold, batch_size, gt, first,
                      need_stage1=bool({"stage1_map", "x_cph"} & set(names)))
    maps["x_ph"], maps["anomaly"] = _stage2_pass(x, b, maps["inpaint_mask"], backend, batch_size)
    scale = 1.0
    if cfg.mask.normalise_map and gt is None:
        scale = volume_scale(maps["stage1_map"], b)
        maps["anomaly"] = maps["anomaly"] / scale
    for name in dict.fromkeys([*names, "stage1_map"]):
        if name in maps:
            _check_finite(name, maps[name])
    arrays = {name: maps[name].float().cpu().numpy() for name in names}
    if "inpaint_mask" in arrays:
        arrays["inpaint_mask"] = arrays["inpaint_mask"] > 0.5
    return ModelMaps(**arrays, slices_inpainted=int(inpainted(maps["inpaint_mask"]).sum()), map_scale=scale)


MIN_SCALE = 1e-6  # a volume whose m(x) is zero over most of its brain is divided by this, not by zero


def volume_scale(stage1: Tensor, brain: Tensor) -> float:
    """The divisor of `mask.normalise_map`: the median of m(x) over the brain pixels of all of a volume's slices
    (a lesion covers too little of a brain to move it; 1 without brain pixels)."""
    inside = stage1[brain > 0]
    return max(float(inside.median()), MIN_SCALE) if inside.numel() else 1.0


def _check_finite(name: str, value: Tensor) -> None:
    """A FloatingPointError naming the map and its slices (indices among the volume's processed slices)."""
    bad = (~torch.isfinite(value.flatten(1))).any(dim=1).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise FloatingPointError(f"non-finite values in the {_MAP_NAMES[name]} map (slice(s) {shown} "
                                 f"of {value.shape[0]})")


def _mask_pass(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig, mask_threshold: float,
               batch_size: int, given: Tensor | None, first: tuple[Tensor, Tensor] | None, need_stage1: bool
               ) -> dict[str, Tensor]:
    """Stage 1 and the inpainting mask of every slice, `batch_size` at a time: x_cph, stage1_map (when computed)
    and inpaint_mask, each (N, 1, S, S) on the backend's device."""
    parts: dict[str, list[Tensor]] = {"x_cph": [], "stage1_map": [], "inpaint_mask": []}
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        found = stage1_masks(x[part], brain[part], backend, cfg, mask_threshold, None if given is None else given[part],
                             None if first is None else (first[0][part], first[1][part]), need_stage1)
        for name, value in zip(parts, found, strict=True):
            if value is not None:
                parts[name].append(value)
    empty = x.shape[0] == 0
    return {name: torch.cat(values) if values else torch.zeros_like(x) for name, values in parts.items()
            if values or empty}


def _stage2_pass(x: Tensor, brain: Tensor, mask: Tensor, backend: Backend, batch_size: int) -> tuple[Tensor, Tensor]:
    """(x_ph, s(x)) of every slice; stage 2 runs on the slices with a non-empty mask, `batch_size` of them at a time."""
    x_ph, anomaly = x.clone(), torch.zeros_like(x)
    active = inpainted(mask).nonzero().flatten()
    for start in range(0, active.numel(), batch_size):
        idx = active[start:start + batch_size]
        x_ph[idx], anomaly[idx] = stage2_maps(x[idx], mask[idx], brain[idx], backend)
    return x_ph, anomaly


def _context_stage1(x: Tensor, brain: Tensor, backend: Backend, cfg: PhanesConfig, batch_size: int
                    ) -> tuple[Tensor, Tensor]:
    """First pass: x_cph and m(x) of every slice, m averaged across neighbouring slices."""
    recon: list[Tensor] = []
    maps: list[Tensor] = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        bb = brain[start:start + batch_size]
        x_cph = backend.reconstruct(xb)
        recon.append(x_cph)
        maps.append(stage1_map(xb, x_cph, bb, backend, cfg.mask))
    if not maps:
        return x.float(), torch.zeros_like(x, dtype=torch.float32)
    return torch.cat(recon), context_average(torch.cat(maps), brain)


@dataclass(frozen=True)
class VolumeMaps:
    """Pipeline results on the native RAS+ voxel grid of one volume, (X, Y, Z) each; None where not kept.

    The lesion mask is not among them: `core.lesion_rule.LesionRule.apply(anomaly, brain, voxel_ml)` makes it.
    """

    anomaly: np.ndarray  # float32 s(x), zero outside the brain
    stage1_map: np.ndarray | None  # float32 m(x), zero outside the brain
    pseudo_healthy: np.ndarray | None  # float32 at the input's intensities
    inpaint_mask: np.ndarray | None  # bool, the mask that was inpainted
    slices_processed: int


def restore_score(model_map: np.ndarray, geometry: SliceGeometry, brain: np.ndarray) -> np.ndarray:
    """A continuous model-grid map on the volume grid: resampled back, clipped at 0, zero outside the brain."""
    return (np.clip(restore_volume(torch.from_numpy(model_map), geometry), 0, None) * brain).astype(np.float32)


def restore_mask(model_mask: np.ndarray, geometry: SliceGeometry, brain: np.ndarray) -> np.ndarray:
    """A binary model-grid mask on the volume grid: its resampled 0.5 level set inside the brain."""
    return (restore_volume(torch.from_numpy(model_mask.astype(np.float32)), geometry) >= 0.5) & brain


def restore_maps(maps: ModelMaps, geometry: SliceGeometry, brain: np.ndarray, scale: float,
                 volume_data: np.ndarray) -> VolumeMaps:
    """Bring one volume's model-grid maps back onto its grid (`brain`, `volume_data`: (X, Y, Z)).

    The pseudo-healthy image keeps the input intensities everywhere except inside the restored inpainting
    mask, where it takes x_ph times the volume's intensity scale: x_ph equals x outside the mask by
    definition, and this avoids resampling blur there.
    """
    inpainted = None if maps.inpaint_mask is None else restore_mask(maps.inpaint_mask, geometry, brain)
    pseudo = None
    if maps.x_ph is not None and inpainted is not None:
        x_ph = restore_volume(torch.from_numpy(maps.x_ph), geometry) * np.float32(scale)
        pseudo = np.where(inpainted, x_ph, volume_data).astype(np.float32)
    return VolumeMaps(anomaly=restore_score(maps.anomaly, geometry, brain),
                      stage1_map=None if maps.stage1_map is None else restore_score(maps.stage1_map, geometry, brain),
                      pseudo_healthy=pseudo, inpaint_mask=inpainted, slices_processed=geometry.n_slices)


def run_volume(
    data: np.ndarray,
    brain: np.ndarray,
    zooms: tuple[float, float, float],
    backend: Backend,
    cfg: PhanesConfig,
    mask_threshold: float,
    batch_size: int = 32,
    keep: Collection[str] = ("stage1_map", "x_ph"),
) -> VolumeMaps:
    """One volume end to end: (X, Y, Z) RAS+ intensities, brain mask and voxel sizes (mm) -> maps on the same grid.

    The composition of `prepare_volume`, `infer_slices` and `restore_maps`; screening runs the same parts
    in separate processes (inference actor, CPU write task). The lesion mask is the caller's next step:
    `LesionRule.apply(maps.anomaly, brain, voxel_ml)`.
    """
    prepared = prepare_volume(data, brain, cfg.preprocess, zooms)
    maps = infer_slices(prepared.slices, prepared.brain, backend, cfg, mask_threshold, batch_size, keep)
    return restore_maps(maps, prepared.geometry, brain, prepared.scale, data)
