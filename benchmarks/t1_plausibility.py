"""T1 plausibility check (`quality.not_t1_brain`): its four figures and the flags `check_volume` gives, on every
real brain in ../shared/data, on T1-like subjects of the 20 shipped label maps, and on images that are not T1 brains.

Real brains: healthy-t1 and glioma-t1 (brain mask by threshold, as screening finds it), head-t1 (brain mask by
the deepbet model, as `--skull-strip auto` gives it: ~1-2 min per head on a CPU), the shipped data/healthy_t1
and MNI152. T1-like: each label map through SynthSeg's model with scanner effects (`tests/_not_t1.t1_subject`).
Not T1 brains: each real brain with inverted contrast inside its mask; each label map as T2, FLAIR, proton
density and CT (mask supplied as a file), T1, FLAIR and CT also with 2x2x2, 1x1x3 and 1x1x5 mm voxels
(block means of the 1 mm image: partial volume); three label maps as CT heads with skull (automatic mask); phantoms.
The last lines are phantoms built past what the check can see (a brain's outline with T1's layering and texture).
Run: PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/t1_plausibility.py [--no-heads]
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phanes_cli.core.volume_io import load_volume, save_nifti
from phanes_cli.inputs.brain_masks import brain_mask_for
from phanes_cli.inputs.quality import GRID_MM, check_volume, t1_figures
from phanes_cli.synth.label_maps import label_map_names, load_label_map
from tests._not_t1 import CONTRASTS, ct_head, limit_phantoms, other_contrast, phantoms, t1_subject

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PACKAGE = Path(__file__).resolve().parents[1] / "phanes_cli" / "data"
Case = tuple[str, str, np.ndarray, np.ndarray, np.ndarray, str]  # group, name, data, brain, affine, mask source


def real_brains(heads: bool) -> list[tuple[str, Path, str]]:
    found = [(f"healthy-t1/{p.name}", p, "never") for p in sorted((DATA / "healthy-t1").glob("*.nii.gz"))]
    found += [(f"shipped/{p.name}", p, "never") for p in sorted((PACKAGE / "healthy_t1").glob("*.nii.gz"))]
    found += [(f"glioma-t1/{p.parent.name}", p, "never") for p in sorted((DATA / "glioma-t1").glob("*/T1.nii.gz"))]
    if heads:
        found += [(f"head-t1/{p.name}", p, "always") for p in sorted((DATA / "head-t1").glob("*.nii.gz"))]
    return [*found, ("shipped MNI152 2009a", PACKAGE / "mni152" / "mni152_2009a_t1_1mm.nii.gz", "never")]


def real_cases(heads: bool) -> Iterator[Case]:
    for name, path, mode in real_brains(heads):
        volume = load_volume(path)
        brain, source = brain_mask_for(volume, None, mode)
        yield "real T1 brain", name, volume.data, brain, volume.affine, source
        if np.allclose(volume.zooms, 1.0, atol=0.01):  # block means in voxels are then in mm
            yield from coarser("real T1 brain", name, volume.data, brain, volume.affine)
        inverted = np.where(brain, float(volume.data[brain].max()) - volume.data, 0.0)
        yield "inverted real brain", f"{name}, inverted", inverted, brain, volume.affine, "file"


def label_map_cases() -> Iterator[Case]:
    rng = np.random.default_rng(0)
    for index, name in enumerate(label_map_names()):
        label_map = load_label_map(name)
        image, brain = t1_subject(label_map, rng)
        yield "T1 from a label map", name, image, brain, label_map.affine, "file"
        yield from coarser("T1", name, image, brain, label_map.affine)
        for contrast in CONTRASTS:
            image, brain = other_contrast(label_map, contrast, rng)
            yield f"{contrast} from a label map", f"{name} {contrast}", image, brain, label_map.affine, "file"
            if contrast in ("FLAIR", "CT"):
                yield from coarser(contrast, name, image, brain, label_map.affine)
        if index < 3:
            head, brain = ct_head(label_map, rng)
            yield "CT head, automatic mask", f"{name} CT head", head, brain, label_map.affine, "auto"


def coarser(contrast: str, name: str, image: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> Iterator[Case]:
    """The image acquired with larger voxels (each the mean of the 1 mm voxels it covers: partial volume)."""
    for block in ((2, 2, 2), (1, 1, 3), (1, 1, 5)):
        size = "x".join(str(b) for b in block)
        scaled = affine @ np.diag([*block, 1.0])
        group = contrast if contrast.startswith("real") else f"{contrast} from a label map"
        yield (f"{group}, {size} mm", f"{name} {size} mm", block_mean(image, block),
               block_mean(brain.astype(np.float32), block) >= 0.5, scaled, "file")


def block_mean(array: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    cut = [n // b * b for n, b in zip(array.shape, block, strict=True)]
    array = array[: cut[0], : cut[1], : cut[2]]
    shape = [x for n, b in zip(cut, block, strict=True) for x in (n // b, b)]
    return array.reshape(shape).mean(axis=(1, 3, 5))


def phantom_cases() -> Iterator[Case]:
    rng = np.random.default_rng(1)
    for name, image, mask in phantoms(rng):
        yield "phantom", name, image, mask, np.eye(4), "file"
    for index in (0, 4):
        outline = load_label_map(label_map_names()[index]).labels > 0
        for name, image, mask in limit_phantoms(outline, rng):
            yield "beyond the check", f"{name} ({index + 1})", image, mask, np.eye(4), "file"


def flags_of(case: Case, folder: Path) -> tuple[list[str], tuple[float, ...]]:
    """check_volume's flags on the case written as NIfTI and read back, and the T1 figures on its check grid."""
    _, _, data, brain, affine, source = case
    volume = load_volume(save_nifti(data.astype(np.float32), affine, folder / "case.nii.gz"))
    if source == "auto":
        brain, source = brain_mask_for(volume, None, "never")
    flags = check_volume(volume, brain, source)
    zooms = np.asarray(volume.zooms, dtype=np.float64)
    step = np.maximum(1, np.floor(GRID_MM / zooms)).astype(int)
    grid = tuple(slice(None, None, int(s)) for s in step)
    return flags, tuple(t1_figures(volume.data[grid], np.asarray(brain, bool)[grid], zooms * step))


def main() -> None:
    heads = "--no-heads" not in sys.argv
    totals: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    print(f"{'group':36s} {'image':48s} layer depth-share bright-depth elongation  flags")
    with tempfile.TemporaryDirectory() as tmp:
        for case in itertools.chain(real_cases(heads), label_map_cases(), phantom_cases()):
            flags, figures = flags_of(case, Path(tmp))
            shown = " ".join(f"{x:5.2f}" for x in figures)
            print(f"{case[0]:36s} {case[1][:48]:48s} {shown}  {','.join(flags) or '-'}", flush=True)
            totals[case[0]] += 1
            caught[case[0]] += "not_t1_brain" in flags
            flagged[case[0]] += bool(flags)
    print(f"\n{'group':36s} images  not_t1_brain  any flag")
    for group, total in totals.items():
        print(f"{group:36s} {total:6d}  {caught[group]:12d}  {flagged[group]:8d}")


if __name__ == "__main__":
    main()
