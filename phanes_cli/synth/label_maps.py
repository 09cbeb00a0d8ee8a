"""T1-like brains generated from individual label maps: SynthSeg's generative model, written for phanes.

Twenty individual brains ship as label maps (SynthSeg's training label maps, Apache-2.0; non-brain labels
removed, so the generated image is already skull-stripped; `phanes_cli/data/synthseg_label_maps.npz`, built by
`tools/build_individual_brains.py`) with SynthSeg's T1 intensity priors. A subject from a label map draws, per
tissue class k, a mean ~ N(prior_means[0, k], prior_means[1, k]) and a spread ~ N(prior_stds[0, k],
prior_stds[1, k]) (0-255 scale), fills every voxel of the class with mean + spread * N(0, 1), blurs the result
(partial volume: a voxel at a tissue border mixes both) and divides by the drawn white-matter mean, so that white
matter is 1.0 as in every `Template`. Anatomy and scanner variation then come from `synth.variation`, exactly as
for the real sources (warp, atrophy, contrast, bias field, blur, noise, resolution).

The classes: SynthSeg's T1 priors have 25 columns, indexed by its `generation_classes_contrast_specific` file,
which is not among the shipped priors (`generation_classes` has 48 classes, left and right apart). `PRIOR_CLASS`
is our reading of that order (background 0, ventricular CSF 1, cerebral white matter 2, cortex 3, cerebellar white
matter 4, cerebellar cortex 5, thalamus 6, caudate 7, putamen 8, pallidum 9, hippocampus/amygdala 10, then the
smaller structures), checked against a real brain: on the FreeSurfer `norm` image and its own aparc+aseg label
map, the class medians relative to white matter (cortex 0.65, ventricles 0.24, thalamus 0.90, caudate 0.78,
putamen 0.84, pallidum 0.96, hippocampus 0.69, cerebellar white matter 0.86, cerebellar cortex 0.61) lie within
0.12 of the priors' means read this way (`tests/test_label_maps.py` holds the numbers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from phanes_cli.errors import InputError
from phanes_cli.synth.templates import Template, box_to_mni, ras_oriented, world_box

PACKAGED_LABEL_MAPS = Path(__file__).resolve().parent.parent / "data" / "synthseg_label_maps.npz"
LABEL_MAP_PREFIX = "synthseg_"

# FreeSurfer (aseg) label -> column of SynthSeg's T1 priors; left and right share a class
_CLASSES: dict[int, tuple[int, ...]] = {
    1: (4, 5, 43, 44, 14, 15, 24, 72, 31, 63),  # ventricles, extracerebral CSF, choroid plexus
    2: (2, 41, 85),  # cerebral white matter, optic chiasm
    3: (3, 42),  # cerebral cortex
    4: (7, 46, 16),  # cerebellar white matter; brainstem (white matter with grey nuclei, as bright on real T1)
    5: (8, 47),  # cerebellar cortex
    6: (10, 49),  # thalamus
    7: (11, 50, 26, 58),  # caudate; accumbens (adjacent, as dark on real T1)
    8: (12, 51),  # putamen
    9: (13, 52),  # pallidum
    10: (17, 53, 18, 54),  # hippocampus, amygdala
    12: (30, 62),  # vessel
    13: (28, 60, 25, 57),  # ventral diencephalon; lesion labels
}
PRIOR_CLASS: dict[int, int] = {label: k for k, labels in _CLASSES.items() for label in labels}
WHITE_MATTER_CLASS = 2
# labels where strokes may sit (grey and white matter, deep nuclei): the `Template.tissue` map
TISSUE_LABELS = (2, 41, 3, 42, 7, 46, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60, 16)
PARTIAL_VOLUME_SIGMA_MM = (0.4, 1.0)
# SynthSeg draws wide contrasts on purpose (a segmenter must ignore contrast); a T1 screening model should see T1
# contrast, whose scanner-to-scanner range `synth.variation.acquire` already adds (grey/white contrast, gamma).
# So the spread of each class's mean and std is this fraction of the prior's.
PRIOR_SPREAD = 0.5


@dataclass(frozen=True)
class LabelMap:
    """One individual brain as a label map (RAS+, 1 mm) with the T1 priors; `template(rng)` draws an image."""

    name: str
    labels: np.ndarray  # (X, Y, Z) uint8 FreeSurfer labels, 0 outside the brain
    affine: np.ndarray  # (4, 4)
    prior_means: np.ndarray  # (2, K): mean and spread of each class's mean intensity (0-255)
    prior_stds: np.ndarray  # (2, K): mean and spread of each class's within-class std
    to_mni: np.ndarray  # (4, 4) world -> MNI world (bounding-box fit, as for the real sources)

    @property
    def brain_box_world(self) -> tuple[np.ndarray, np.ndarray]:
        return world_box(self.labels > 0, self.affine)

    def classes(self) -> np.ndarray:
        """Prior class of every voxel (0 outside the brain; unknown brain labels take the white-matter class)."""
        lut = np.full(256, WHITE_MATTER_CLASS, dtype=np.int64)
        lut[0] = 0
        for label, k in PRIOR_CLASS.items():
            lut[label] = k
        return lut[self.labels]

    def template(self, rng: np.random.Generator | None = None) -> Template:
        """A Template of this brain: intensities drawn from the priors (`rng`), or the prior means (None)."""
        classes = self.classes()
        brain = self.labels > 0
        if rng is None:
            means, spreads, sigma = self.prior_means[0], np.zeros(self.prior_means.shape[1]), 0.7
        else:
            means = np.clip(rng.normal(self.prior_means[0], PRIOR_SPREAD * self.prior_means[1]), 1.0, None)
            spreads = np.clip(rng.normal(self.prior_stds[0], PRIOR_SPREAD * self.prior_stds[1]), 0.0, None)
            sigma = float(rng.uniform(*PARTIAL_VOLUME_SIGMA_MM))
        image = means.astype(np.float32)[classes]
        if rng is not None:
            image += spreads.astype(np.float32)[classes] * rng.standard_normal(image.shape, dtype=np.float32)
        image[~brain] = 0.0
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        image = ndimage.gaussian_filter(image, sigma / zooms, truncate=3.0)
        image = np.where(brain, np.clip(image, 0.0, None) / means[WHITE_MATTER_CLASS], 0.0).astype(np.float32)
        tissue = np.isin(self.labels, TISSUE_LABELS).astype(np.float32)
        return Template(name=self.name, image=image, affine=self.affine, brain=brain.astype(np.float32),
                        tissue=tissue, to_mni=self.to_mni)


@functools.lru_cache(maxsize=1)
def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the packaged label maps ({exc})") from exc


def label_map_names(path: Path = PACKAGED_LABEL_MAPS) -> list[str]:
    """Source names of the packaged label maps, sorted (synthseg_training_seg_01, ...)."""
    return sorted(LABEL_MAP_PREFIX + key.split("/")[0] for key in _read(path) if key.endswith("/labels"))


def load_label_map(name: str, reference: Template | None = None, path: Path = PACKAGED_LABEL_MAPS) -> LabelMap:
    """One packaged label map by source name, reoriented to RAS+; `to_mni` fits its brain box onto `reference`'s
    (identity without one)."""
    archive = _read(path)
    key = name.removeprefix(LABEL_MAP_PREFIX)
    if f"{key}/labels" not in archive:
        raise InputError(path, f"no label map {name!r}; the label maps are {', '.join(label_map_names(path))}")
    data, affine = ras_oriented(archive[f"{key}/labels"], archive[f"{key}/affine"])
    labels = np.rint(data).astype(np.uint8)
    to_mni = np.eye(4) if reference is None else box_to_mni(labels > 0, affine, reference)
    return LabelMap(name=name, labels=labels, affine=affine, to_mni=to_mni,
                    prior_means=archive["priors/prior_means_t1"].astype(np.float64),
                    prior_stds=archive["priors/prior_stds_t1"].astype(np.float64))
