"""A whole synthetic cohort on disk: images, brain masks, lesion labels and the manifest.

Reproducibility: subject `index` of role healthy (0) or lesion (1) draws everything from
SeedSequence([seed, role, index]), split into independent streams for anatomy, lesions and
acquisition. A subject therefore does not depend on how many others are made, and a lesion subject's
healthy base (same anatomy and acquisition streams, no lesion) is reproducible exactly.

Sources and splits: every source brain (nilearn's MNI152, the four real T1s shipped in
phanes_cli/data/healthy_t1, any `--templates`) belongs to exactly one split, so no brain is seen in two
splits (augmented copies of one brain are not independent). Default: val = Colin27, test = the niimath
adult (two individual brains rather than population averages, so thresholds are tuned and measured on
individual anatomy), train = the rest (nilearn MNI152 2009a, ANTs MNI152, ICBM 2009 and any
`--templates`); `--val-sources` / `--test-sources` choose others by name. Healthy subject `index` uses
source `index` of the round-robin order (one train, one val, one test source first, so two subjects
already give train + val, three add a healthy test control; then the other sources in name order) and
takes that source's split: healthy test subjects are the controls `phanes evaluate` counts false
positives on. Lesion subjects are test and use the test sources round-robin.
Lesions: `--kind stroke` places real expert-drawn stroke masks (the bank shipped with the package, or
every mask of `--lesion-shapes DIR`); `--lesion-source procedural` grows irregular shapes instead.
Voxel size: 1.5 mm by default. The model sees axial slices padded square and resized to 128 x 128;
at 1.5 mm the MNI grid (brain box + 10 mm margin) is 111 x 135 x 117, so a slice is ~135 voxels across,
already about the model's 128: finer grids add no detail the model keeps, while a volume has 3.4x fewer
voxels than at 1 mm (synthesis, preprocessing and screening are that much faster). 2 mm would upsample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phanes_cli.core.volume_io import save_nifti
from phanes_cli.errors import ConfigError, InputError
from phanes_cli.inputs.manifest import ManifestRow, write_manifest
from phanes_cli.synth.lesion_bank import ShapeBank, folder_bank, npz_bank
from phanes_cli.synth.lesions import LesionConfig, stroke_lesions
from phanes_cli.synth.sprites import sprite_volume
from phanes_cli.synth.templates import (
    MNI152_NAME,
    Grid,
    Template,
    load_templates,
    output_grid,
    template_files,
    template_name,
)
from phanes_cli.synth.variation import VariationConfig, acquire, sample_anatomy

KINDS = ("stroke", "sprites")
LESION_SOURCES = ("real", "procedural")
HEALTHY, LESION = 0, 1
DEFAULT_VOXEL_SIZE = 1.5
DEFAULT_VARIATION = VariationConfig()
DEFAULT_LESIONS = LesionConfig()
DEFAULT_VAL_SOURCES = ("antspy_colin27_ch2_T1",)
DEFAULT_TEST_SOURCES = ("niimath_adult_T1",)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject on its grid (RAS+)."""

    image: np.ndarray  # (X, Y, Z) float32, scanner units
    brain: np.ndarray  # (X, Y, Z) bool
    lesion: np.ndarray | None  # (X, Y, Z) bool ground truth; None for healthy subjects
    base: np.ndarray | None  # (X, Y, Z) float32 the same subject without lesions (when asked for)
    affine: np.ndarray  # (4, 4)
    template: str
    lesion_sources: tuple[str, ...] = ()

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def lesion_ml(self) -> float | None:
        return None if self.lesion is None else float(self.lesion.sum()) * self.voxel_ml


def _streams(seed: int, role: int, index: int
             ) -> tuple[np.random.Generator, np.random.SeedSequence, np.random.Generator]:
    """Anatomy generator, acquisition seed (re-playable for the base image) and lesion generator."""
    anatomy, acquisition, lesion = np.random.SeedSequence([seed, role, index]).spawn(3)
    return np.random.default_rng(anatomy), acquisition, np.random.default_rng(lesion)


def make_subject(template: Template, grid: Grid, seed: int, index: int, kind: str | None = None,
                 lesion_shapes: ShapeBank | None = None, keep_base: bool = False,
                 variation: VariationConfig = DEFAULT_VARIATION, lesions: LesionConfig = DEFAULT_LESIONS) -> Subject:
    """Build one subject: healthy when `kind` is None, else with "stroke" lesions (real shapes from
    `lesion_shapes`, procedural when None) or "sprites"."""
    role = HEALTHY if kind is None else LESION
    anatomy_rng, acquisition_seed, lesion_rng = _streams(seed, role, index)
    anatomy = sample_anatomy(template, grid, anatomy_rng, variation)

    def scan(image: np.ndarray) -> np.ndarray:
        return acquire(image, anatomy.brain, np.random.default_rng(acquisition_seed), variation)

    if kind is None:
        return Subject(scan(anatomy.image), anatomy.brain, None, None, grid.affine, template.name)
    if kind == "stroke":
        lesioned = stroke_lesions(anatomy, lesion_rng, lesions, lesion_shapes, template.to_mni)
        return Subject(scan(lesioned.image), anatomy.brain, lesioned.mask, scan(anatomy.image) if keep_base else None,
                       grid.affine, template.name, lesioned.sources)
    if kind == "sprites":
        healthy = scan(anatomy.image)
        image, mask = sprite_volume(healthy, anatomy.brain, lesion_rng)
        return Subject(image, anatomy.brain, mask, healthy if keep_base else None, grid.affine, template.name,
                       ("sprites",))
    raise ConfigError(f"unknown lesion kind {kind!r}; choose one of {', '.join(KINDS)}")


def _validate(out: Path, healthy: int, lesions: int, kind: str, seed: int, voxel_size: float,
              lesion_shapes: Path | None, lesion_source: str) -> None:
    if healthy < 0 or lesions < 0:
        raise ConfigError(f"subject counts must not be negative (got --healthy {healthy}, --lesions {lesions})")
    if healthy + lesions == 0:
        raise ConfigError("nothing to make: ask for at least one subject with --healthy or --lesions")
    if kind not in KINDS:
        raise ConfigError(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    if lesion_source not in LESION_SOURCES:
        raise ConfigError(f"unknown --lesion-source {lesion_source!r}; choose one of {', '.join(LESION_SOURCES)}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if not 0.5 <= voxel_size <= 4.0:
        raise ConfigError(f"voxel size must be between 0.5 and 4 mm, got {voxel_size}")
    if lesion_shapes is not None and (kind != "stroke" or lesion_source != "real"):
        raise ConfigError("--lesion-shapes places real stroke masks: it needs --kind stroke and --lesion-source real")
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")


def source_splits(names: list[str], val: tuple[str, ...] = DEFAULT_VAL_SOURCES,
                  test: tuple[str, ...] = DEFAULT_TEST_SOURCES) -> dict[str, str]:
    """The split of every source brain: `val` and `test` by name, every other source train."""
    unknown = sorted((set(val) | set(test)) - set(names))
    if unknown:
        raise ConfigError(f"unknown source brain(s) {', '.join(unknown)}; the sources are {', '.join(names)}")
    if set(val) & set(test):
        raise ConfigError(f"source brain(s) {', '.join(sorted(set(val) & set(test)))} cannot be both val and test")
    if not val or not test:
        raise ConfigError("name at least one val and one test source brain")
    splits = {name: "val" if name in val else "test" if name in test else "train" for name in names}
    if "train" not in splits.values():
        raise ConfigError("every source brain is val or test: leave at least one for training")
    return splits


def round_robin(names: list[str], splits: dict[str, str]) -> list[int]:
    """Source order for healthy subjects: the first train, val and test source, then the rest in name order."""
    firsts = [names.index(next(n for n in names if splits[n] == split)) for split in ("train", "val", "test")]
    return firsts + [i for i in range(len(names)) if i not in firsts]


def _shape_bank(kind: str, lesion_source: str, lesion_shapes: Path | None) -> ShapeBank | None:
    if kind != "stroke" or lesion_source != "real":
        return None
    return folder_bank(Path(lesion_shapes)) if lesion_shapes is not None else npz_bank()


def synth_cohort(out: Path, healthy: int, lesions: int, kind: str = "stroke", seed: int = 0,
                 lesion_shapes: Path | None = None, templates: Path | None = None,
                 voxel_size: float = DEFAULT_VOXEL_SIZE, progress: Callable[[str], None] | None = None,
                 lesion_source: str = "real", val_sources: tuple[str, ...] = DEFAULT_VAL_SOURCES,
                 test_sources: tuple[str, ...] = DEFAULT_TEST_SOURCES) -> Path:
    """Write `healthy` + `lesions` synthetic T1 subjects under `out`; returns the manifest path.

    Layout: out/images/<id>.nii.gz (float32), out/masks/<id>_brain.nii.gz (uint8),
    out/labels/<id>_lesion.nii.gz (uint8, lesion subjects), out/manifest.parquet.
    Ids: healthy-0000..., and stroke-0000... or sprites-0000....
    `progress` is called exactly once per subject written, with "<id> (k/n)".
    """
    out = Path(out)
    _validate(out, healthy, lesions, kind, seed, voxel_size, lesion_shapes, lesion_source)
    shapes = _shape_bank(kind, lesion_source, lesion_shapes)
    report = progress or (lambda message: None)
    files = template_files(None if templates is None else Path(templates))
    names = [MNI152_NAME] + [template_name(p) for p in files]
    splits = source_splits(names, tuple(val_sources), tuple(test_sources))
    pool = load_templates(files)
    order = round_robin(names, splits)
    tests = [i for i in order if splits[names[i]] == "test"]
    grids: dict[int, Grid] = {}
    rows: list[ManifestRow] = []
    plan = [(None, i) for i in range(healthy)] + [(kind, i) for i in range(lesions)]
    for done, (subject_kind, index) in enumerate(plan, start=1):
        which = order[index % len(order)] if subject_kind is None else tests[index % len(tests)]
        grid = grids.setdefault(which, output_grid(pool[which], voxel_size))
        subject = make_subject(pool[which], grid, seed, index, subject_kind, shapes)
        sid = f"{subject_kind or 'healthy'}-{index:04d}"
        image = save_nifti(subject.image, subject.affine, out / "images" / f"{sid}.nii.gz")
        brain = save_nifti(subject.brain, subject.affine, out / "masks" / f"{sid}_brain.nii.gz", dtype=np.uint8)
        label = None
        if subject.lesion is not None:
            label = save_nifti(subject.lesion, subject.affine, out / "labels" / f"{sid}_lesion.nii.gz", dtype=np.uint8)
        rows.append(ManifestRow(
            id=sid, image=image, brain_mask=brain, lesion_mask=label,
            split="test" if subject_kind else splits[names[which]],
            kind=subject_kind or "healthy", lesion_ml=subject.lesion_ml,
            extra={"template": subject.template, "seed": seed,
                   "lesion_source": ";".join(subject.lesion_sources) if subject.lesion_sources else None},
        ))
        report(f"{sid} ({done}/{len(plan)})")
    return write_manifest(rows, out / "manifest.parquet")
