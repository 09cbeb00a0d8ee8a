"""A whole synthetic cohort on disk: images, brain masks, lesion labels and the manifest.

Reproducibility: subject `index` of role healthy (0) or lesion (1) draws everything from
SeedSequence([seed, role, index]), split into independent streams for anatomy, lesions and
acquisition. A subject therefore does not depend on how many others are made, and a lesion subject's
healthy base (same anatomy and acquisition streams, no lesion) is reproducible exactly.

Sources and splits: every source brain (nilearn's MNI152, the six real T1s shipped in
phanes_cli/data/healthy_t1, the 20 label maps of `synth.label_maps`, any `--templates`) belongs to exactly one
split, so no brain is seen in two splits (augmented copies of one brain are not independent). Default: val =
Colin27 and the StudyForrest adult (raw scanner intensities, skull-stripped by phanes), test = the niimath adult
(raw intensities) and the FreeSurfer `norm` brain (intensity-normalised by FreeSurfer: prepared differently
from both validation brains); train = the three population templates (nilearn MNI152 2009a, ANTs MNI152, ICBM
2009), every label map and any `--templates`. `--val-sources` / `--test-sources` choose others by name.
Healthy subjects follow `healthy_sources`: a cycle of one train, one val, one test source, then the other val
and test sources, then train slots up to 60% of the cycle; a train slot takes a label-map subject with
probability `label_map_fraction` (deterministically spread), else the next real train source. Healthy test
subjects are the controls `phanes evaluate` counts false positives on. Lesion subjects are test and use the
test sources round-robin. The manifest's `source` column names each subject's brain (report per test brain).
Lesions: `--kind stroke` places real expert-drawn stroke masks (the bank shipped with the package, or
every mask of `--lesion-shapes DIR`); `--lesion-source procedural` grows irregular shapes instead.
The options and their defaults (voxel size included) are `synth.options.SynthOptions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phanes_cli.core.volume_io import save_nifti
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.manifest import ManifestRow, write_manifest
from phanes_cli.synth.label_maps import LabelMap, label_map_names, load_label_map
from phanes_cli.synth.lesion_bank import ShapeBank, folder_bank, npz_bank
from phanes_cli.synth.lesions import LesionConfig, stroke_lesions
from phanes_cli.synth.options import (
    DEFAULT_LABEL_MAP_FRACTION,
    DEFAULT_TEST_SOURCES,
    DEFAULT_VAL_SOURCES,
    KINDS,
    SynthOptions,
)
from phanes_cli.synth.sprites import sprite_volume
from phanes_cli.synth.templates import (
    MNI152_NAME,
    Grid,
    Template,
    load_extra_templates,
    load_mni152,
    load_template_file,
    output_grid,
    template_files,
    template_name,
)
from phanes_cli.synth.variation import VariationConfig, acquire, sample_anatomy

HEALTHY, LESION = 0, 1
DEFAULT_VARIATION = VariationConfig()
DEFAULT_LESIONS = LesionConfig()
TRAIN_SHARE = 0.6  # train slots fill the healthy cycle up to this share
Source = Template | LabelMap


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


def make_subject(source: Source, grid: Grid, seed: int, index: int, kind: str | None = None,
                 lesion_shapes: ShapeBank | None = None, keep_base: bool = False,
                 variation: VariationConfig = DEFAULT_VARIATION, lesions: LesionConfig = DEFAULT_LESIONS) -> Subject:
    """Build one subject: healthy when `kind` is None, else with "stroke" lesions (real shapes from
    `lesion_shapes`, procedural when None) or "sprites". A label map first draws its tissue intensities
    (`LabelMap.template`) from the anatomy stream."""
    role = HEALTHY if kind is None else LESION
    anatomy_rng, acquisition_seed, lesion_rng = _streams(seed, role, index)
    template = source.template(anatomy_rng) if isinstance(source, LabelMap) else source
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


def healthy_sources(count: int, names: list[str], splits: dict[str, str], pooled: set[str],
                    fraction: float = DEFAULT_LABEL_MAP_FRACTION) -> list[int]:
    """Source index of each of `count` healthy subjects (see the module docstring).

    `pooled`: the label-map sources; those in the train split are drawn from as one pool by the train slots
    (the k-th train subject is a label map when floor((k + 1) f) > floor(k f), so any prefix holds the fraction
    f up to one subject); label maps named val or test are ordinary sources of their split.
    """
    pool = [i for i, n in enumerate(names) if n in pooled and splits[n] == "train"]
    real = [i for i, n in enumerate(names) if i not in pool]
    real_train = [i for i in real if splits[names[i]] == "train"]
    held = {split: [i for i in real if splits[names[i]] == split] for split in ("val", "test")}
    rest = held["val"][1:] + held["test"][1:]
    n_train = max(len(real_train), 1, int(np.ceil(TRAIN_SHARE / (1 - TRAIN_SHARE) * (len(rest) + 2))))
    cycle: list[int | None] = [None, held["val"][0], held["test"][0], *rest, *[None] * (n_train - 1)]
    out: list[int] = []
    counters = {"train": 0, "pool": 0, "real": 0}
    for index in range(count):
        slot = cycle[index % len(cycle)]
        if slot is not None:
            out.append(slot)
            continue
        k = counters["train"]
        counters["train"] += 1
        from_pool = bool(pool) and (not real_train or np.floor((k + 1) * fraction) > np.floor(k * fraction))
        which, members = ("pool", pool) if from_pool else ("real", real_train)
        out.append(members[counters[which] % len(members)])
        counters[which] += 1
    return out


def _shape_bank(kind: str, lesion_source: str, lesion_shapes: Path | None) -> ShapeBank | None:
    if kind != "stroke" or lesion_source != "real":
        return None
    return folder_bank(Path(lesion_shapes)) if lesion_shapes is not None else npz_bank()


def synth_cohort(options: SynthOptions, progress: Callable[[str], None] | None = None) -> Path:
    """Write `options.healthy` + `options.lesions` synthetic T1 subjects under `options.out`; returns the manifest
    path.

    Layout: out/images/<id>.nii.gz (float32), out/masks/<id>_brain.nii.gz (uint8),
    out/labels/<id>_lesion.nii.gz (uint8, lesion subjects), out/manifest.parquet.
    Ids: healthy-0000..., and stroke-0000... or sprites-0000.... Manifest extras: `source` (the source brain),
    `source_kind` (image or label_map), `seed`, `lesion_source`.
    `progress` is called exactly once per subject written, with "<id> (k/n)". `options.only_splits`: write only
    the subjects of these splits, exactly as the whole cohort would hold them (same ids and images; e.g. the
    validation volumes a shipped model was calibrated on, without synthesising the rest).
    """
    options.validate()
    out, kind, seed = Path(options.out), options.kind, options.seed
    shapes = _shape_bank(kind, options.lesion_source, options.lesion_shapes)
    report = progress or (lambda message: None)
    files = template_files(None if options.templates is None else Path(options.templates))
    label_names = label_map_names()
    names = [MNI152_NAME] + [template_name(p) for p in files] + label_names
    splits = source_splits(names, tuple(options.val_sources), tuple(options.test_sources))
    mni = load_mni152()
    sources: dict[int, Source] = {0: mni, **load_extra_templates(files, mni)}

    def source(i: int) -> Source:  # shipped templates and label maps load on first use: a small cohort reads a few
        if i not in sources:
            sources[i] = load_template_file(files[i - 1], mni) if i <= len(files) else load_label_map(names[i], mni)
        return sources[i]

    tests = [i for i in round_robin(names, splits) if splits[names[i]] == "test"]
    picks = healthy_sources(options.healthy, names, splits, set(label_names), options.label_map_fraction)
    plan = ([(None, i, picks[i]) for i in range(options.healthy)]
            + [(kind, i, tests[i % len(tests)]) for i in range(options.lesions)])
    if options.only_splits is not None:
        plan = [p for p in plan if ("test" if p[0] else splits[names[p[2]]]) in options.only_splits]
    grids: dict[int, Grid] = {}
    rows: list[ManifestRow] = []
    for done, (subject_kind, index, which) in enumerate(plan, start=1):
        grid = grids.setdefault(which, output_grid(source(which), options.voxel_size))
        subject = make_subject(source(which), grid, seed, index, subject_kind, shapes)
        sid = f"{subject_kind or 'healthy'}-{index:04d}"
        rows.append(_write_subject(out, sid, subject, "test" if subject_kind else splits[names[which]],
                                   subject_kind or "healthy", {
                                       "source": subject.template, "seed": seed,
                                       "source_kind": "label_map" if names[which] in label_names else "image",
                                       "lesion_source": ";".join(subject.lesion_sources) or None}))
        report(f"{sid} ({done}/{len(plan)})")
    return write_manifest(rows, out / "manifest.parquet")


def _write_subject(out: Path, sid: str, subject: Subject, split: str, kind: str, extra: dict[str, object]
                   ) -> ManifestRow:
    """A subject's image, brain mask and (lesion subjects) label under `out`, as its manifest row."""
    image = save_nifti(subject.image, subject.affine, out / "images" / f"{sid}.nii.gz")
    brain = save_nifti(subject.brain, subject.affine, out / "masks" / f"{sid}_brain.nii.gz", dtype=np.uint8)
    label = None
    if subject.lesion is not None:
        label = save_nifti(subject.lesion, subject.affine, out / "labels" / f"{sid}_lesion.nii.gz", dtype=np.uint8)
    return ManifestRow(id=sid, image=image, brain_mask=brain, lesion_mask=label, split=split, kind=kind,
                       lesion_ml=subject.lesion_ml, extra=extra)
