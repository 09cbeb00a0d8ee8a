"""Build the individual-anatomy data shipped in phanes_cli/data from ../shared/data (run once; outputs committed).

- healthy_t1/studyforrest_T1w_brain.nii.gz: the StudyForrest head (0.7 x 0.67 x 0.67 mm, skull present) skull-stripped
  with the project's own brain extraction (`inputs.brain_masks.model_brain_mask`, deepbet), cropped to the brain's box
  plus 4 mm and resampled to 1 mm (trilinear; the cohorts are made at 1.5 mm), int16.
- healthy_t1/niivue_fs_norm_T1.nii.gz: copied unchanged (FreeSurfer norm.mgz, already skull-stripped).
- synthseg_label_maps.npz: the 20 SynthSeg training label maps, non-brain labels (the 500s) set to 0, each cropped to
  its brain's box plus 4 voxels (1 mm), uint8 labels; with SynthSeg's T1 priors (`synth.label_maps` reads it).

Usage: python tools/build_individual_brains.py [--shared ../shared/data] [--skip-forrest]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from phanes_cli.core.volume_io import load_volume, save_nifti
from phanes_cli.inputs.brain_masks import model_brain_mask

DATA = Path(__file__).resolve().parents[1] / "phanes_cli" / "data"
NON_BRAIN_FROM = 500  # SynthSeg's extra-cerebral labels (skull, scalp, eyes, ...) are 502..530


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def strip_forrest(shared: Path) -> None:
    """deepbet on the head, crop, resample to 1 mm on an axis-aligned RAS grid."""
    volume = load_volume(shared / "head-t1" / "studyforrest_T1w.nii.gz", max_voxels=10**9)
    brain = model_brain_mask(volume)
    box = _box(brain, 6)
    data = np.where(brain, volume.data, 0.0)[box]
    zooms = np.asarray(volume.zooms, dtype=np.float64)
    corner = volume.affine @ np.array([s.start for s in box] + [1.0])
    shape = np.floor((np.array(data.shape) - 1) * zooms).astype(int) + 1
    coords = np.stack(np.meshgrid(*(np.arange(n) / z for n, z in zip(shape, zooms, strict=True)), indexing="ij"))
    out = ndimage.map_coordinates(data, coords, order=1, mode="constant", cval=0.0)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(1.0 / zooms)  # same directions, 1 mm steps
    affine[:3, 3] = corner[:3]
    save_nifti(np.clip(np.round(out), 0, 32767), affine, DATA / "healthy_t1" / "studyforrest_T1w_brain.nii.gz",
               dtype=np.int16)
    print("studyforrest brain", out.shape, f"{brain.sum() * np.prod(zooms) / 1000:.0f} mL")


def pack_label_maps(shared: Path) -> None:
    """Brain labels of every map cropped to its box; one npz with the priors."""
    folder = shared / "label-maps" / "synthseg"
    arrays: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("training_seg_*.nii.gz")):
        img = nib.load(path)
        labels = np.asarray(img.dataobj).astype(np.int32)
        labels[labels >= NON_BRAIN_FROM] = 0
        box = _box(labels > 0, 4)
        name = path.name.split(".")[0]
        arrays[f"{name}/labels"] = labels[box].astype(np.uint8)
        affine = img.affine.copy()
        affine[:3, 3] = (img.affine @ np.array([s.start for s in box] + [1.0]))[:3]
        arrays[f"{name}/affine"] = affine
    for prior in ("generation_labels", "generation_classes", "prior_means_t1", "prior_stds_t1"):
        arrays[f"priors/{prior}"] = np.load(folder / "priors" / f"{prior}.npy")
    np.savez_compressed(DATA / "synthseg_label_maps.npz", **arrays)
    print("label maps", (DATA / "synthseg_label_maps.npz").stat().st_size // 1000, "kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--skip-forrest", action="store_true")
    args = parser.parse_args()
    shutil.copyfile(args.shared / "healthy-t1" / "niivue_fs_norm_T1.nii.gz",
                    DATA / "healthy_t1" / "niivue_fs_norm_T1.nii.gz")
    pack_label_maps(args.shared)
    if not args.skip_forrest:
        strip_forrest(args.shared)


if __name__ == "__main__":
    main()
