"""The options of one evaluation (`phanes evaluate` flags) and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phanes_cli.errors import ConfigError, InputError
from phanes_cli.evaluation.methods import DEFAULT_METHODS, validate_methods


@dataclass(frozen=True)
class EvaluateOptions:
    """Everything `phanes evaluate` takes: which bundle, which manifest rows, which methods, where the results go."""

    bundle: Path
    manifest: Path
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    split: str = "test"  # the manifest split of the volumes with lesion masks
    device: str = "auto"
    batch_size: int = 32
    synthetic: bool = True  # also the paper's sprite protocol (Table 1)
    synthetic_slices: int = 30
    seed: int = 0  # of the synthetic lesions
    lpips_weights: str | None = None
    progress: bool = True
    skull_strip: str = "auto"  # auto | always | never (inputs/brain_masks.py)
    backend: str = "auto"
    sources: tuple[str, ...] = ()  # only rows whose manifest `source` is one of these (all when empty)

    def validate(self) -> tuple[str, ...]:
        """The method names to run (validated, duplicates dropped); a bad option is a one-line error, raised
        before any volume is read."""
        names = validate_methods(self.methods)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.synthetic and self.synthetic_slices < 1:
            raise ConfigError(f"the synthetic protocol needs at least 1 slice, got {self.synthetic_slices}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise InputError(Path(self.out), "--out must be a folder, but a file is there")
        return names
