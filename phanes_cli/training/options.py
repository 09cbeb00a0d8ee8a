"""The options of one training run (`phanes train` flags, with the run config read) and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phanes_cli.config import PhanesConfig
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.brain_masks import check_mode


@dataclass(frozen=True)
class TrainOptions:
    """Everything `phanes train` takes before it calibrates: the run config, the healthy volumes, the bundle folder."""

    config: PhanesConfig  # the run config (`config.load_config` of --config)
    manifest: Path  # healthy train and val volumes
    out: Path  # the model bundle folder written (uncalibrated)
    resume: bool = False  # continue from the last checkpoint in `out`
    stage1_from: Path | None = None  # a bundle whose stage 1 (RA) is kept: only stage 2 is trained
    device: str = "auto"
    skull_strip: str = "auto"  # auto | always | never (inputs/brain_masks.py)
    lpips_weights: str | None = None
    progress: bool = True

    def validate(self) -> None:
        """A one-line error naming the first bad option, before any volume is read or anything is written."""
        check_mode(self.skull_strip)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"{self.out}: --out must be a folder, and this is a file")
        if self.stage1_from is not None and not Path(self.stage1_from).is_dir():
            raise ConfigError(f"--stage1-from {self.stage1_from}: not a model bundle folder")
