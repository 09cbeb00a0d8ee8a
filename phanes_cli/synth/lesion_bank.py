"""Real lesion shapes in MNI space: a folder of binary NIfTI masks, or the bank shipped with the package.

The shipped bank (`phanes_cli/data/stroke_lesion_shapes.npz`) holds 300 of the 1089 expert-drawn acute
stroke masks of the Stroke Outcome Optimization Project (BSD-2-Clause, see NOTICE), picked at evenly
spaced ranks of lesion volume: the bank keeps the real size distribution (median a few mL) and its
extremes (the smallest, well under 1 mL, and the largest, several hundred mL). To stay small, each
mask is stored cropped to its bounding box, bit-packed, in one compressed .npz with the box offsets
and the common grid's affine (SPM MNI, 1 mm, 157 x 189 x 136, LAS), so a box and its affine
reproduce the original mask exactly in world space. `build_bank` makes the file from the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phanes_cli.core.volume_io import load_volume
from phanes_cli.errors import InputError
from phanes_cli.synth.templates import nifti_files

PACKAGED_BANK = Path(__file__).resolve().parent.parent / "data" / "stroke_lesion_shapes.npz"
BANK_SIZE = 300


@dataclass(frozen=True)
class Shape:
    """One binary lesion mask and the affine from its voxels to MNI world mm."""

    name: str
    mask: np.ndarray  # (X, Y, Z) bool
    affine: np.ndarray  # (4, 4)

    @property
    def volume_ml(self) -> float:
        return float(self.mask.sum()) * abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class ShapeBank:
    """Named lesion shapes loaded on demand (`get`), so a folder of a thousand masks costs nothing up front."""

    source: str  # where the shapes come from, for messages
    names: tuple[str, ...]
    loader: Callable[[int], Shape]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, index: int) -> Shape:
        return self.loader(index)


def folder_bank(folder: Path) -> ShapeBank:
    """Every NIfTI mask of `folder` (name order), read through volume_io (any orientation)."""
    files = nifti_files(Path(folder), "lesion-shapes")

    def load(index: int) -> Shape:
        volume = load_volume(files[index])
        return Shape(files[index].name, volume.data > 0.5, volume.affine)

    return ShapeBank(str(folder), tuple(p.name for p in files), load)


def npz_bank(path: Path = PACKAGED_BANK) -> ShapeBank:
    """The cropped, bit-packed bank written by `build_bank` (default: the one shipped with the package)."""
    if not path.is_file():
        raise InputError(path, "lesion shape bank not found (reinstall phanes or pass --lesion-shapes DIR)")
    with np.load(path) as bank:
        names = tuple(str(n) for n in bank["names"])
        offsets, sizes, starts = bank["offsets"], bank["sizes"], bank["starts"]
        bits, affine = bank["bits"], bank["affine"].astype(np.float64)

    def load(index: int) -> Shape:
        size = tuple(int(s) for s in sizes[index])
        flat = np.unpackbits(bits[starts[index] : starts[index + 1]], count=int(np.prod(size)))
        shift = np.eye(4)
        shift[:3, 3] = offsets[index]
        return Shape(names[index], flat.reshape(size).astype(bool), affine @ shift)

    return ShapeBank(str(path), names, load)


def pick_by_volume(volumes: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` shapes at evenly spaced ranks of volume (smallest and largest included), sorted by volume."""
    order = np.argsort(volumes, kind="stable")
    ranks = np.unique(np.round(np.linspace(0, len(order) - 1, min(count, len(order)))).astype(int))
    return order[ranks]


def build_bank(folder: Path, out: Path, count: int = BANK_SIZE) -> Path:
    """Write `count` masks of `folder` (one common grid) as a cropped, bit-packed .npz; returns `out`."""
    source = folder_bank(folder)
    volumes = np.array([source.get(i).volume_ml for i in range(len(source))])  # one at a time: ~4 MB each
    nonempty = np.flatnonzero(volumes > 0)
    if nonempty.size == 0:
        raise InputError(folder, "no lesion mask in this folder has a voxel set")
    chosen = [source.get(int(nonempty[i])) for i in pick_by_volume(volumes[nonempty], count)]
    affine = chosen[0].affine
    if any(s.mask.shape != chosen[0].mask.shape or not np.allclose(s.affine, affine) for s in chosen):
        raise InputError(folder, "lesion masks must share one grid (shape and affine) to be banked")
    boxes = []
    for shape in chosen:
        idx = np.argwhere(shape.mask)
        lo, hi = idx.min(0), idx.max(0) + 1
        boxes.append((lo, shape.mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]))
    packed = [np.packbits(box.ravel()) for _, box in boxes]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, names=np.array([s.name for s in chosen]), affine=affine,
        offsets=np.array([lo for lo, _ in boxes], dtype=np.int32),
        sizes=np.array([box.shape for _, box in boxes], dtype=np.int32),
        starts=np.concatenate([[0], np.cumsum([p.size for p in packed])]).astype(np.int64),
        bits=np.concatenate(packed), volume_ml=np.array([s.volume_ml for s in chosen], dtype=np.float32),
    )
    return out
