"""Same brain, same burden: one model on the same real brains prepared in different ways.

Each brain (real individuals of the manifest's test split, optionally with real stroke shapes inserted) is
written again as the variants a site might send: padded to a 256 mm field of view, cropped to the brain,
resampled to 0.8 / 1 / 2 mm isotropic, and reoriented (voxel axes permuted and flipped). The brain mask goes
through the same transform, so only the preparation differs. Every variant goes through `phanes_cli.predict`;
the table gives its lesion burden, the difference from the original file's, and the Dice of its lesion mask
with the original's after both are brought onto the original grid (nibabel resampling through the affines).

--oracle-resolution adds, for every copy resampled finer than its original, a row screened with the blur
computed from the original's voxel size instead of the copy's header (the model's `preprocess.resolution_mm`
set so that the added blur is what the original file gets): what a perfect estimate of a file's true
resolution would buy. An experiment, not a product setting.

Usage:
    python benchmarks/scale_invariance.py runs/real/manifest.parquet [--bundle B] [--brains 4] [--lesions]
        [--oracle-resolution]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.processing import resample_from_to, resample_to_output

from phanes_cli import predict
from phanes_cli.calibrate.insertion import insert_lesion
from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.core.shipped_models import default_bundle
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest
from phanes_cli.synth.lesion_bank import npz_bank
from phanes_cli.synth.templates import load_mni152

Pair = tuple[nib.Nifti1Image, nib.Nifti1Image]  # (image, brain mask)


def _shifted(pair: Pair, start: np.ndarray, data: np.ndarray, mask: np.ndarray) -> Pair:
    affine = pair[0].affine.copy()
    affine[:3, 3] = pair[0].affine[:3, :3] @ start + pair[0].affine[:3, 3]
    return nib.Nifti1Image(data, affine), nib.Nifti1Image(mask, affine)


def padded(pair: Pair, field_mm: float = 256.0) -> Pair:
    """Zeros around the volume until every axis spans at least `field_mm`."""
    zooms = np.asarray(pair[0].header.get_zooms()[:3])
    shape = np.asarray(pair[0].shape[:3])
    extra = np.maximum(0, np.ceil((field_mm / zooms - shape) / 2)).astype(int) + 4
    width = [(int(e), int(e)) for e in extra]
    return _shifted(pair, -extra, np.pad(np.asarray(pair[0].dataobj), width),
                    np.pad(np.asarray(pair[1].dataobj), width))


def cropped(pair: Pair, margin: int = 2) -> Pair:
    """The volume cut to the brain mask's bounding box plus `margin` voxels."""
    mask = np.asarray(pair[1].dataobj) > 0
    where = np.argwhere(mask)
    low = np.maximum(where.min(0) - margin, 0)
    high = np.minimum(where.max(0) + margin + 1, mask.shape)
    cut = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    return _shifted(pair, low, np.asarray(pair[0].dataobj)[cut], np.asarray(pair[1].dataobj)[cut])


def resampled(pair: Pair, mm: float) -> Pair:
    """Isotropic `mm` voxels (linear for the image, the mask's 0.5 level of its linear resampling)."""
    image = resample_to_output(nib.Nifti1Image(np.asarray(pair[0].dataobj, np.float32), pair[0].affine),
                               (mm, mm, mm), order=1)
    mask = resample_to_output(nib.Nifti1Image(np.asarray(pair[1].dataobj, np.float32), pair[1].affine),
                              (mm, mm, mm), order=1)
    return image, nib.Nifti1Image((np.asarray(mask.dataobj) >= 0.5).astype(np.uint8), mask.affine)


def reoriented(pair: Pair, codes: str = "PIL") -> Pair:
    """The same voxels stored in another axis order and direction."""
    transform = ornt_transform(io_orientation(pair[0].affine), axcodes2ornt(tuple(codes)))
    shape = pair[0].shape[:3]
    affine = pair[0].affine @ inv_ornt_aff(transform, shape)
    return (nib.Nifti1Image(apply_orientation(np.asarray(pair[0].dataobj), transform), affine),
            nib.Nifti1Image(apply_orientation(np.asarray(pair[1].dataobj), transform), affine))


VARIANTS: dict[str, Callable[[Pair], Pair]] = {
    "original": lambda p: p, "padded 256 mm": padded, "cropped to brain": cropped,
    "0.8 mm": lambda p: resampled(p, 0.8), "1 mm": lambda p: resampled(p, 1.0), "2 mm": lambda p: resampled(p, 2.0),
    "reoriented PIL": reoriented,
}


def base_pair(row: ManifestRow, lesion_seed: int | None) -> tuple[Pair, float]:
    """A manifest row as (image, brain mask) on its RAS+ grid, with real lesions inserted when a seed is given:
    (pair, true lesion mL)."""
    volume, brain, _ = load_with_brain(row.image, row.brain_mask)
    data, truth_ml = volume.data, 0.0
    if lesion_seed is not None:
        data, truth = insert_lesion(volume.data, brain, volume.affine, npz_bank(), load_mni152(),
                                    np.random.default_rng(lesion_seed), 2)
        truth_ml = float(truth.sum()) * volume.voxel_ml
    return (nib.Nifti1Image(data.astype(np.float32), volume.affine),
            nib.Nifti1Image(brain.astype(np.uint8), volume.affine)), truth_ml


def on_grid(mask: nib.Nifti1Image, like: nib.Nifti1Image) -> np.ndarray:
    """A lesion mask brought onto another grid through both affines (its 0.5 level after linear resampling)."""
    moved = resample_from_to(nib.Nifti1Image(np.asarray(mask.dataobj, np.float32), mask.affine), like, order=1)
    return np.asarray(moved.dataobj) >= 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def with_true_resolution(model: Bundle, original_mm: float, copy_mm: float) -> Bundle | None:
    """`model` with its resolution set so that a copy at `copy_mm` voxels is blurred as its original at
    `original_mm` is (FWHMs in quadrature), or None where the copy is not finer than its original."""
    if copy_mm >= original_mm - 1e-6:
        return None
    target = model.config.preprocess.resolution_mm
    added = max(target ** 2 - original_mm ** 2, 0.0)
    preprocess = dataclasses.replace(model.config.preprocess, resolution_mm=float(np.sqrt(added + copy_mm ** 2)))
    return dataclasses.replace(model, config=dataclasses.replace(model.config, preprocess=preprocess))


def run_brain(row: ManifestRow, model: Bundle, lesion_seed: int | None, oracle: bool) -> list[dict[str, object]]:
    """Every variant of one brain through the model: burden, difference and Dice against the original."""
    base, truth_ml = base_pair(row, lesion_seed)
    original_mm = float(min(base[0].header.get_zooms()[:3]))
    runs: list[tuple[str, Pair, Bundle]] = []
    for name, make in VARIANTS.items():
        image, mask = make(base)
        runs.append((name, (image, mask), model))
        oracle_model = with_true_resolution(model, original_mm, float(min(image.header.get_zooms()[:3])))
        if oracle and oracle_model is not None:
            runs.append((f"{name}, true res.", (image, mask), oracle_model))
    out: list[dict[str, object]] = []
    reference: nib.Nifti1Image | None = None
    reference_ml = 0.0
    for name, (image, mask), used in runs:
        started = time.perf_counter()
        result = predict(image, used, brain_mask=mask, device="cpu", backend="torch")
        seconds = time.perf_counter() - started
        burden = float(result.statistics["lesion_burden_ml"])
        if reference is None:
            reference, reference_ml = result.lesion_mask, burden
        moved = on_grid(result.lesion_mask, reference)
        out.append({"brain": row.id, "variant": name, "true_ml": truth_ml, "burden_ml": burden,
                    "diff_ml": burden - reference_ml,
                    "dice": dice(moved, np.asarray(reference.dataobj) > 0), "seconds": seconds,
                    "shape": "x".join(str(s) for s in image.shape[:3])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--bundle", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--brains", type=int, default=4, help="test brains per site (IXI-HH and ds002748)")
    parser.add_argument("--lesions", action="store_true", help="insert two real stroke shapes into each brain")
    parser.add_argument("--oracle-resolution", action="store_true",
                        help="also screen finer copies blurred from their original's true resolution")
    args = parser.parse_args()
    model = load_bundle(args.bundle if args.bundle is not None else default_bundle())
    rows = [r for r in read_manifest(args.manifest) if r.split == "test"]
    chosen = [r for site in ("IXI-HH", "ds002748")
              for r in [r for r in rows if r.extra.get("site") == site][: args.brains]]
    records = [rec for i, row in enumerate(chosen)
               for rec in run_brain(row, model, i if args.lesions else None, args.oracle_resolution)]
    print(f"model {model.path.name}; {'lesioned' if args.lesions else 'healthy'} brains; burden in mL")
    print(f"{'brain':24s} {'variant':26s} {'shape':12s} {'true':>6s} {'burden':>7s} {'diff':>7s} {'Dice':>5s} "
          f"{'s':>5s}")
    for r in records:
        print(f"{r['brain']!s:24s} {r['variant']!s:26s} {r['shape']!s:12s} {r['true_ml']:6.1f} {r['burden_ml']:7.2f} "
              f"{r['diff_ml']:+7.2f} {r['dice']:5.2f} {r['seconds']:5.1f}")
    worst = max(abs(float(r["diff_ml"])) for r in records)  # type: ignore[arg-type]
    lowest = min(float(r["dice"]) for r in records)  # type: ignore[arg-type]
    print(f"largest |burden difference| {worst:.2f} mL; lowest Dice with the original {lowest:.2f}")


if __name__ == "__main__":
    main()
