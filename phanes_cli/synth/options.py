"""The options of one synthetic cohort (`phanes data synth` flags) and their validation.

Voxel size: 1.5 mm by default, the size of a model pixel at the shipped grid (`preprocess.field_mm` 192 mm over
128 px): finer grids add no detail the model keeps, while a 1.5 mm volume has 3.4x fewer voxels than at 1 mm
(synthesis, preprocessing and screening are that much faster).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phanes_cli.errors import ConfigError, InputError

KINDS = ("stroke", "sprites")
LESION_SOURCES = ("real", "procedural")
DEFAULT_VOXEL_SIZE = 1.5
DEFAULT_VAL_SOURCES = ("antspy_colin27_ch2_T1", "studyforrest_T1w_brain")
DEFAULT_TEST_SOURCES = ("niimath_adult_T1", "niivue_fs_norm_T1")
# share of training subjects generated from label maps (the rest: real train images); judge it on validation
DEFAULT_LABEL_MAP_FRACTION = 0.5


@dataclass(frozen=True)
class SynthOptions:
    """Everything `phanes data synth` takes (synth/cohort.py says how sources, splits and lesions are drawn)."""

    out: Path
    healthy: int  # healthy subjects (train, val and test splits by source brain)
    lesions: int  # lesion subjects (test split)
    kind: str = "stroke"  # stroke | sprites
    seed: int = 0  # the same seed gives the same cohort
    lesion_shapes: Path | None = None  # folder of real lesion masks; default: the bank shipped with phanes
    templates: Path | None = None  # folder of extra real T1 templates (train split unless named below)
    voxel_size: float = DEFAULT_VOXEL_SIZE  # mm, of the synthesised grid
    lesion_source: str = "real"  # real | procedural stroke shapes
    val_sources: tuple[str, ...] = DEFAULT_VAL_SOURCES
    test_sources: tuple[str, ...] = DEFAULT_TEST_SOURCES
    label_map_fraction: float = DEFAULT_LABEL_MAP_FRACTION
    # write only the subjects of these splits, exactly as the whole cohort would hold them (same ids and images)
    only_splits: tuple[str, ...] | None = None

    def validate(self) -> None:
        """A one-line error for the first bad option, before anything is written."""
        if self.healthy < 0 or self.lesions < 0:
            raise ConfigError(f"subject counts must not be negative (got --healthy {self.healthy}, "
                              f"--lesions {self.lesions})")
        if self.healthy + self.lesions == 0:
            raise ConfigError("nothing to make: ask for at least one subject with --healthy or --lesions")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown --kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.lesion_source not in LESION_SOURCES:
            raise ConfigError(f"unknown --lesion-source {self.lesion_source!r}; "
                              f"choose one of {', '.join(LESION_SOURCES)}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if not 0.5 <= self.voxel_size <= 4.0:
            raise ConfigError(f"voxel size must be between 0.5 and 4 mm, got {self.voxel_size}")
        if self.lesion_shapes is not None and (self.kind != "stroke" or self.lesion_source != "real"):
            raise ConfigError("--lesion-shapes places real stroke masks: it needs --kind stroke and "
                              "--lesion-source real")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise InputError(Path(self.out), "output path exists and is not a folder")
        if not 0.0 <= self.label_map_fraction <= 1.0:
            raise ConfigError(f"--label-map-fraction must lie between 0 and 1, got {self.label_map_fraction}")
