"""Run configuration: one YAML file holds the model sizes, preprocessing, mask and training constants.

The defaults are the paper's (see ../shared/method.md); `configs/*.yaml` override them per size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from phanes_cli.errors import ConfigError


@dataclass(frozen=True)
class RAConfig:
    """Stage 1 Soft-IntroVAE sizes."""

    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    latent_dim: int = 128


@dataclass(frozen=True)
class AOTConfig:
    """Stage 2 AOT-GAN generator and discriminator sizes."""

    base_channels: int = 64
    channels: int = 256
    blocks: int = 8
    rates: tuple[int, ...] = (1, 2, 4, 8)
    disc_channels: tuple[int, ...] = (64, 128, 256, 512)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume becomes model slices."""

    image_size: int = 128
    percentile: float = 98.0
    min_brain_fraction: float = 0.05
    slice_mode: str = "brain"  # "brain": every slice with enough brain; "mid": the paper's one mid-axial slice


@dataclass(frozen=True)
class MaskConfig:
    """Constants of the mask generation (paper Eq. 3) and the final anomaly map (Eq. 4)."""

    clahe_tiles: int = 8
    clahe_clip: float = 0.01
    clahe_bins: int = 256
    norm_percentile: float = 95.0
    lpips_sigma: float = 2.0
    dilation_sigma: float = 1.2
    dilation_threshold: float = 0.1
    mask_percentile: float = 99.0
    anomaly_percentile: float = 99.0
    per_image_percentile: float | None = None  # reference-code behaviour, off by default


@dataclass(frozen=True)
class StageTrainConfig:
    """Optimisation of one stage."""

    max_epochs: int = 1500
    max_steps: int | None = None
    lr: float = 5e-5
    patience: int = 20
    val_every: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule shared by both stages."""

    seed: int = 0
    batch_size: int = 8
    checkpoint_every: int = 1
    # VGG style/perceptual losses on images resized to this side (None: the model resolution). 64 px
    # halves a CPU stage 2 step; the L1 and adversarial terms stay at full resolution.
    perceptual_size: int | None = None
    stage1: StageTrainConfig = field(default_factory=StageTrainConfig)
    stage2: StageTrainConfig = field(default_factory=StageTrainConfig)
    random_masks_per_image: int = 10


@dataclass(frozen=True)
class PhanesConfig:
    """Everything a run needs; serialised into every model bundle."""

    name: str = "paper"
    ra: RAConfig = field(default_factory=RAConfig)
    aot: AOTConfig = field(default_factory=AOTConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


T = TypeVar("T")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> PhanesConfig:
    """Build a config from plain data (a parsed YAML file or a bundle's config.json)."""
    cfg = _build(PhanesConfig, data, "config")
    if cfg.preprocess.slice_mode not in ("brain", "mid"):
        raise ConfigError(f"config.preprocess.slice_mode: must be 'brain' or 'mid', got {cfg.preprocess.slice_mode!r}")
    if len(cfg.ra.channels) != 5:
        raise ConfigError("config.ra.channels: the encoder has exactly 5 stages (128 px -> 4 px)")
    return cfg


def load_config(path: str | Path) -> PhanesConfig:
    """Read a YAML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return config_from_dict(data)
