"""Real T1 templates that synthetic subjects are grown from.

The first template is nilearn's MNI152 2009a brain, shipped in `phanes_cli/data/mni152` (no nilearn, no
network), with its brain mask and grey/white-matter probability maps. Four more real T1s
ship with phanes (`phanes_cli/data/healthy_t1`: one adult, Colin27, the ANTs MNI152 and ICBM 2009
templates). They and extra real T1s (`--templates DIR`) are read through `volume_io.load_volume`
(canonical RAS+, any file orientation); they come without masks, so the brain mask is
`preprocess.auto_brain_mask` (the one screening uses) and the tissue map comes from a white-matter
intensity estimate.

Intensities are normalised so that white matter is 1.0 in every template: lesion contrast and noise
levels are then defined once, relative to white matter, whatever the source scanner units were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import is_nifti_path, load_volume
from phanes_cli.errors import InputError
from phanes_cli.infra.packaged_data import mni152_image, mni152_path

MNI152_NAME = "nilearn-mni152-2009a"
# Real healthy T1s shipped with the package (unchanged files; licences and sources in data/NOTICE)
PACKAGED_TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "healthy_t1"


@dataclass(frozen=True)
class Template:
    """One real T1 brain on its own grid, RAS+ voxel order."""

    name: str
    image: np.ndarray  # (X, Y, Z) float32, white matter ~ 1.0, zero outside the brain
    affine: np.ndarray  # (4, 4) voxel -> world mm (RAS)
    brain: np.ndarray  # (X, Y, Z) float32 in {0, 1}
    tissue: np.ndarray  # (X, Y, Z) float32 probability of grey or white matter: where strokes may sit
    to_mni: np.ndarray  # (4, 4) template world -> MNI world (identity for MNI templates)

    @property
    def brain_box_world(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper world corners (mm) of the brain's bounding box."""
        return world_box(self.brain > 0.5, self.affine)


@dataclass(frozen=True)
class Grid:
    """The isotropic output grid a template's subjects are written on."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) voxel -> world mm, diagonal (RAS+), isotropic voxel_size

    @property
    def voxel_size(self) -> float:
        return float(self.affine[0, 0])

    @property
    def voxel_ml(self) -> float:
        return self.voxel_size**3 / 1000.0

    def world(self) -> np.ndarray:
        """World coordinates of every voxel centre, (3, X, Y, Z) float32."""
        axes = [self.affine[i, 3] + self.affine[i, i] * np.arange(n, dtype=np.float64)
                for i, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def world_box(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of a mask's voxel centres (from per-axis projections, not a list of every voxel)."""
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    lo = np.array([span[0] for span in spans], dtype=np.float64)
    hi = np.array([span[-1] for span in spans], dtype=np.float64)
    vox = lo + corners * (hi - lo)
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    return world.min(0), world.max(0)


class BrainBox(Protocol):
    """A source brain with a world bounding box (a `Template`, or a `label_maps.LabelMap`)."""

    @property
    def brain_box_world(self) -> tuple[np.ndarray, np.ndarray]: ...


def output_grid(template: BrainBox, voxel_size: float, margin_mm: float = 10.0) -> Grid:
    """An axis-aligned RAS grid around the template's brain (plus a margin), at `voxel_size` mm.

    Cropping to the brain keeps every subject small (fast synthesis and screening) while the margin
    leaves room for the random affine and elastic deformation.
    """
    lo, hi = template.brain_box_world
    lo = lo - margin_mm
    hi = hi + margin_mm
    shape = tuple(int(np.ceil((h - low) / voxel_size)) + 1 for low, h in zip(lo, hi, strict=True))
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = lo
    return Grid(shape=shape, affine=affine)  # type: ignore[arg-type]


def white_matter_level(image: np.ndarray, brain: np.ndarray) -> float:
    """Typical white-matter intensity of a T1 brain without a tissue map.

    White matter is the brightest large tissue class in T1: the median of the voxels above the
    brain's 70th percentile lands on it (checked against the MNI152 WM map: within 3%).
    """
    values = image[brain]
    return float(np.median(values[values >= np.percentile(values, 70)]))


def _array(img: object) -> np.ndarray:
    return np.asarray(img.dataobj, dtype=np.float32)  # type: ignore[attr-defined]


def ras_oriented(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array to RAS+ voxel order and return it with the matching affine."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    return (
        np.ascontiguousarray(nib.apply_orientation(data, ornt)).astype(np.float32),
        affine @ inv_ornt_aff(ornt, data.shape),
    )


def load_mni152() -> Template:
    """The MNI152 2009a template (nilearn's, shipped in phanes_cli/data/mni152), with its brain mask and GM/WM maps."""
    import nibabel as nib

    t1 = mni152_image("t1_1mm")
    affine = np.asarray(t1.affine, dtype=np.float64)
    image, ras_affine = ras_oriented(_array(t1), affine)
    brain, _ = ras_oriented(_array(nib.load(mni152_path("brainmask_1mm"))), affine)
    gm, _ = ras_oriented(_array(nib.load(mni152_path("gm_1mm"))), affine)
    wm, _ = ras_oriented(_array(nib.load(mni152_path("wm_1mm"))), affine)
    brain = (brain > 0.5).astype(np.float32)
    wm_level = float(np.median(image[wm > 0.9]))
    return Template(
        name=MNI152_NAME,
        image=(image * brain / wm_level).astype(np.float32),
        affine=ras_affine,
        brain=brain,
        tissue=np.clip(gm + wm, 0.0, 1.0).astype(np.float32) * brain,
        to_mni=np.eye(4),
    )


def _box_fit(src: tuple[np.ndarray, np.ndarray], dst: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """World affine mapping one brain bounding box onto another (per-axis scale and shift)."""
    scale = (dst[1] - dst[0]) / np.maximum(src[1] - src[0], 1e-6)
    out = np.eye(4)
    out[:3, :3] = np.diag(scale)
    out[:3, 3] = dst[0] - scale * src[0]
    return out


def box_to_mni(brain: np.ndarray, affine: np.ndarray, reference: Template) -> np.ndarray:
    """World affine fitting a brain's bounding box (bool mask on `affine`'s grid) onto the reference brain's box."""
    return _box_fit(world_box(brain, affine), reference.brain_box_world)


def load_template_file(path: Path, reference: Template) -> Template:
    """An extra real T1: brain mask from intensities; tissue = brain voxels brighter than half of WM.

    `to_mni` fits the brain's bounding box onto the reference (MNI) brain's box, so that real lesion
    shapes drawn in MNI space land on comparable anatomy even for a template in native space.
    """
    volume = load_volume(path)
    brain = auto_brain_mask(volume.data)
    if brain.sum() < 1000:
        raise InputError(path, "no brain found (fewer than 1000 foreground voxels); expected a skull-stripped T1")
    wm_level = white_matter_level(volume.data, brain)
    if wm_level <= 0:
        raise InputError(path, "brain intensities are not positive; expected a T1-weighted image")
    image = np.where(brain, volume.data / wm_level, 0.0).astype(np.float32)
    tissue = (brain & (image > 0.5)).astype(np.float32)
    return Template(
        name=template_name(path),
        image=image,
        affine=volume.affine,
        brain=brain.astype(np.float32),
        tissue=tissue,
        to_mni=box_to_mni(brain, volume.affine, reference),
    )


def nifti_files(folder: Path, what: str) -> list[Path]:
    """Sorted NIfTI files of a folder (sorted: the random pick per seed must not depend on listing order)."""
    if not folder.exists():
        raise InputError(folder, f"{what} folder not found")
    if not folder.is_dir():
        raise InputError(folder, f"{what} must be a folder of NIfTI files, not a file")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))
    if not files:
        raise InputError(folder, f"{what} folder holds no NIfTI files (.nii or .nii.gz)")
    return files


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def template_name(path: Path) -> str:
    """A template file's source name: its file name without extensions."""
    return path.name.split(".")[0]


def template_files(extra: Path | None = None, packaged: bool = True) -> list[Path]:
    """The real T1s after nilearn's MNI152: the shipped ones (`PACKAGED_TEMPLATES`, name order), then `extra`'s.

    A file of `extra` byte-identical to a shipped one is skipped: the same brain twice could land in two
    splits. Names must be unique (they decide the split of a source); a clash is an InputError.
    """
    files = nifti_files(PACKAGED_TEMPLATES, "packaged templates") if packaged else []
    shipped = {_digest(p) for p in files}
    if extra is not None:
        files += [p for p in nifti_files(Path(extra), "templates") if _digest(p) not in shipped]
    names = [MNI152_NAME] + [template_name(p) for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(extra or PACKAGED_TEMPLATES,
                         f"template name(s) {', '.join(twice)} appear twice; rename the file(s)")
    return files


def load_extra_templates(files: list[Path], reference: Template) -> dict[int, Template]:
    """The templates among `files` (see `template_files`) that did not ship with phanes, by their index in
    [MNI152, *files]: a user's `--templates` are read at once, so a bad file fails before anything is written;
    the shipped ones are known good and load when a subject first uses them."""
    return {i: load_template_file(p, reference) for i, p in enumerate(files, start=1)
            if p.parent != PACKAGED_TEMPLATES}
