"""What an exported runtime must compute like fp32 torch before it may run a bundle: `phanes export`'s checks.

`parity`: every runtime (ONNX Runtime, TensorRT, the gated CPU backends) through the whole pipeline next to
torch on random and real brain slices: max |difference| of x_cph, x_ph and s(x) within PARITY_ATOL of its
precision, and on a calibrated bundle lesion masks agreeing on >= 99.9% of voxels.

`gate`: the cheaper CPU backends (INT8 graphs, OpenVINO in fp32 and with a bf16 generator) must in addition
reproduce the fp32 lesion masks on real brains (fp32 ONNX Runtime, which `parity` has matched to torch, computes
them at about twice torch's speed): the candidate runs the pipeline end to end (its own inpainting masks) on
slices of the healthy individuals shipped with phanes (`samples.GATE_BRAINS`, never seen by INT8 calibration),
and at each operating point its lesion mask must agree with the fp32 one on >= 99.9% of the voxels with a Dice
>= 0.98.
The operating points are the bundle's calibrated anomaly threshold (when calibrated) and the level of the fp32
map's top 1% of brain voxels, so a healthy brain on which the calibrated rule finds almost nothing still gives a
mask large enough to judge. The verdict, passed or not, carries the figures and goes into the provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.pipeline import SliceMaps, run_slices, stage1_map, volume_scale
from phanes_cli.runtimes.artefacts import ArtefactError
from phanes_cli.runtimes.samples import GATE_BRAINS, brain_slices, random_slices, shipped_brain_slices

# Max |runtime - torch| allowed through the whole pipeline (maps in [0, 1] for x_cph and x_ph; s(x) is smaller).
# INT8: the bound of a network that is still the same one (quantisation error of a few grey levels); whether
# the masks survive it is the gate's question.
PARITY_ATOL: dict[str, dict[str, float]] = {
    "fp32": {"x_cph": 1e-4, "x_ph": 1e-4, "anomaly": 1e-4},
    "fp16": {"x_cph": 2e-2, "x_ph": 2e-2, "anomaly": 2e-2},
    "int8": {"x_cph": 5e-2, "x_ph": 5e-2, "anomaly": 5e-2},
    "bf16": {"x_cph": 1e-4, "x_ph": 2e-2, "anomaly": 2e-2},  # openvino-bf16: the generator only, stage 1 fp32
}
# Voxel agreement of the lesion masks (s >= calibrated threshold). The dilated inpainting mask's agreement is
# recorded too but not gated: dilation turns one pixel flipped at the threshold into a blob.
MIN_LESION_AGREEMENT = 0.999
PARITY_SLICES = {"random": 4, "brain": 8}
MIN_DICE = 0.98
MIN_DICE_VOXELS = 100  # Dice is judged where the fp32 mask has at least this many voxels (else recorded only)
TOP_FRACTION = 0.01  # the second operating point: the fp32 map's top 1% of brain voxels
GATE_SLICES_PER_BRAIN = 8
GATE_BATCH = 8


def reference_mask_threshold(bundle: Bundle, reference: Backend, x: Tensor, brain: Tensor) -> float:
    """The bundle's mask threshold, or (uncalibrated) about the 95th percentile of torch's own m(x) on these slices."""
    if bundle.calibration is not None:
        return bundle.calibration.mask_threshold
    m = stage1_map(x, reference.reconstruct(x), brain, reference, bundle.config.mask)
    values = m[brain > 0].sort().values
    k = min(int(0.95 * values.numel()), values.numel() - 2)
    return float(values[k] + values[k + 1]) / 2  # between two values: no pixel sits on the threshold itself


@dataclass(frozen=True)
class ParitySet:
    """One slice set of the parity check with torch's maps on it, computed once for every candidate."""

    label: str
    x: Tensor
    brain: Tensor
    level: float  # the mask threshold
    maps: SliceMaps


def parity_sets(bundle: Bundle, reference: Backend) -> list[ParitySet]:
    """torch through the pipeline on PARITY_SLICES (random images, real brain slices)."""
    sets = []
    for label, n in PARITY_SLICES.items():
        cfg = bundle.config.preprocess
        x, brain = random_slices(cfg, n) if label == "random" else brain_slices(cfg, n)
        x, brain = x.to(reference.device), brain.to(reference.device)
        level = reference_mask_threshold(bundle, reference, x, brain)
        sets.append(ParitySet(label, x, brain, level, run_slices(x, brain, reference, bundle.config, level)))
    return sets


def _parity_row(bundle: Bundle, candidate: Backend, ref: ParitySet) -> dict[str, float]:
    """x_ph and s(x) with the reference's inpainting mask given to both (a threshold flip on one pixel does not
    hide a network difference); the candidate's own masks scored as voxel agreement."""
    cfg, want = bundle.config, ref.maps
    same_mask = run_slices(ref.x, ref.brain, candidate, cfg, ref.level, given_mask=want.inpaint_mask)
    own = run_slices(ref.x, ref.brain, candidate, cfg, ref.level)
    row = {key: float((getattr(same_mask, key).to(want.x.device) - getattr(want, key)).abs().max())
           for key in ("x_cph", "x_ph", "anomaly")}
    row["mask_agreement"] = float((own.inpaint_mask.to(want.x.device) == want.inpaint_mask).float().mean())
    if bundle.calibration is not None:
        rule, inside = LesionRule.from_calibration(bundle.calibration), ref.brain.cpu().numpy()
        own_lesions = rule.candidates(own.anomaly.float().cpu().numpy(), inside)
        row["lesion_agreement"] = float((own_lesions == rule.candidates(want.anomaly.cpu().numpy(), inside)).mean())
    return row


def parity_figures(bundle: Bundle, candidate: Backend, sets: list[ParitySet],
                   precision: str = "fp32") -> tuple[dict[str, Any], list[str]]:
    """Max abs differences (candidate vs torch) of x_cph, x_ph and s(x), and mask agreements, per slice set; and
    the figures outside PARITY_ATOL / MIN_LESION_AGREEMENT, each as '<set>: <figure> > <bound>'."""
    tolerance, results, problems = PARITY_ATOL[precision], {}, []
    for ref in sets:
        row = results[ref.label] = _parity_row(bundle, candidate, ref)
        problems += [f"{ref.label} slices: {key} {row[key]:.2e} > {limit:.0e}"
                     for key, limit in tolerance.items() if row[key] > limit]
        if row.get("lesion_agreement", 1.0) < MIN_LESION_AGREEMENT:
            problems.append(f"{ref.label} slices: lesion mask agreement {row['lesion_agreement']:.4%} "
                            f"< {MIN_LESION_AGREEMENT:.1%}")
    return {"tolerance": tolerance, "min_lesion_agreement": MIN_LESION_AGREEMENT, **results}, problems


def parity(bundle: Bundle, candidate: Backend, sets: list[ParitySet], precision: str = "fp32") -> dict[str, Any]:
    """`parity_figures`, raising ArtefactError (nothing is written) when a figure is out of bounds."""
    results, problems = parity_figures(bundle, candidate, sets, precision)
    if problems:
        raise ArtefactError(f"{candidate.name} disagrees with torch: {'; '.join(problems)}; nothing was written")
    return results


@dataclass(frozen=True)
class GateReference:
    """fp32 on the gate's real brain slices: its s(x), the mask threshold and the operating points."""

    x: Tensor
    brain: Tensor
    anomaly: np.ndarray
    mask_threshold: float
    levels: dict[str, float]  # operating point name -> anomaly threshold


def _anomaly(backend: Backend, bundle: Bundle, x: Tensor, brain: Tensor, mask_threshold: float) -> np.ndarray:
    """s(x) of the whole pipeline on `backend`, in batches; with `mask.normalise_map`, each gate brain's slices
    divided by that brain's `volume_scale`, as a volume's are (the calibrated level is on that scale)."""
    parts = [run_slices(x[i:i + GATE_BATCH], brain[i:i + GATE_BATCH], backend, bundle.config, mask_threshold)
             for i in range(0, x.shape[0], GATE_BATCH)]
    anomaly = torch.cat([p.anomaly for p in parts]).float().cpu()
    if bundle.config.mask.normalise_map:
        stage1 = torch.cat([p.stage1_map for p in parts]).float().cpu()
        for start in range(0, x.shape[0], GATE_SLICES_PER_BRAIN):
            own = slice(start, start + GATE_SLICES_PER_BRAIN)
            anomaly[own] /= volume_scale(stage1[own], brain[own])
    return anomaly.numpy()


def gate_reference(bundle: Bundle, reference: Backend) -> GateReference:
    """Run an fp32 backend once on the gate slices; every candidate is compared with this."""
    x, brain = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS, GATE_SLICES_PER_BRAIN)
    with torch.inference_mode():
        level = reference_mask_threshold(bundle, reference, x, brain)
        anomaly = _anomaly(reference, bundle, x, brain, level)
    inside = anomaly[brain.numpy() > 0]
    levels = {"top 1% of the fp32 map": float(np.quantile(inside, 1.0 - TOP_FRACTION))}  # inside the brain
    if bundle.calibration is not None:
        levels = {"calibrated": bundle.calibration.anomaly_threshold, **levels}
    return GateReference(x=x, brain=brain, anomaly=anomaly, mask_threshold=level, levels=levels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def mask_figures(bundle: Bundle, candidate: Backend, ref: GateReference) -> tuple[dict[str, Any], list[str]]:
    """Per operating point: voxel agreement, Dice and voxel counts of the candidate's lesion masks vs fp32's;
    and the figures outside the gate's bounds."""
    with torch.inference_mode():
        anomaly = _anomaly(candidate, bundle, ref.x, ref.brain, ref.mask_threshold)
    inside, figures, problems = ref.brain.numpy(), {}, []
    for name, threshold in ref.levels.items():
        want, got = (LesionRule(threshold).candidates(s, inside) for s in (ref.anomaly, anomaly))
        row = figures[name] = {"threshold": threshold, "agreement": float((want == got).mean()),
                               "dice": dice(want, got), "fp32_voxels": int(want.sum()), "voxels": int(got.sum())}
        if row["agreement"] < MIN_LESION_AGREEMENT:
            problems.append(f"lesion voxel agreement {row['agreement']:.3%} < {MIN_LESION_AGREEMENT:.1%} ({name})")
        if row["fp32_voxels"] >= MIN_DICE_VOXELS and row["dice"] < MIN_DICE:
            problems.append(f"lesion Dice {row['dice']:.3f} < {MIN_DICE} ({name})")
    return figures, problems


def gate(bundle: Bundle, candidate: Backend, sets: list[ParitySet], ref: GateReference,
         precision: str) -> dict[str, Any]:
    """The verdict on one candidate backend: parity at `precision` and lesion masks on real brains, with figures."""
    parity_results, problems = parity_figures(bundle, candidate, sets, precision)
    masks, mask_problems = mask_figures(bundle, candidate, ref)
    problems += mask_problems
    return {"passed": not problems, "reason": "; ".join(problems) or None, "precision": precision,
            "parity": parity_results, "masks": masks, "mask_slices": int(ref.x.shape[0]), "mask_brains": GATE_BRAINS,
            "bounds": {"min_agreement": MIN_LESION_AGREEMENT, "min_dice": MIN_DICE, "min_dice_voxels": MIN_DICE_VOXELS}}


def verdict_line(backend: str, verdict: dict[str, Any]) -> str:
    """One line: the backend passed, with the figures that decided it, or was refused, with the failing ones."""
    if not verdict["passed"]:
        return f"gate {backend}: REFUSED, {verdict['reason']}"
    masks = "; ".join(f"{name}: agreement {r['agreement']:.3%}, Dice {r['dice']:.4f} ({r['fp32_voxels']} voxels)"
                      for name, r in verdict["masks"].items())
    return (f"gate {backend}: passed; max |diff| of s(x) {verdict['parity']['brain']['anomaly']:.1e}; lesion masks "
            f"vs fp32 on {verdict['mask_slices']} slices of {len(verdict['mask_brains'])} real brains, {masks}")
