"""Run configuration: one YAML file holds the model sizes, preprocessing, mask and training constants.

The defaults are the paper's (see ../shared/method.md); `configs/*.yaml` override them per size.
"""

from __future__ import annotations

import contextlib
import math
import reprlib
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

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
    field_mm: float = 192.0  # the square field of view every slice is cut to: a model pixel is field_mm / image_size
    resolution_mm: float = 2.0  # finer files are blurred to this effective resolution (FWHM); 0: no blur
    percentile: float = 98.0
    min_brain_fraction: float = 0.05
    slice_mode: str = "brain"  # "brain": every slice with enough brain; "mid": the paper's one mid-axial slice

    @property
    def pixel_mm(self) -> float:
        """Model pixel size, also the spacing of the axial model slices (an isotropic model grid)."""
        return self.field_mm / self.image_size


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
    # m(x) is zeroed within this many model pixels of the brain boundary (0: the paper). A small model's
    # reconstruction misses individual cortex and skull-strip edges; see docs/measurements.md "Stage 1 map study".
    edge_margin_px: int = 0
    # m(x) of each slice averaged with its neighbours (1/4, 1/2, 1/4) before binarising (`core.slice_context`);
    # the mask threshold is then a percentile of the averaged map. Off: it did not raise validation Dice
    # (docs/measurements.md, Specificity).
    slice_context: bool = False
    # s(x) divided by the median of the volume's own m(x) over its brain (`pipeline.volume_scale`): a volume whose
    # healthy tissue reconstructs worse (a site or preparation the model saw less) reads higher everywhere, and
    # one operating point then means the same at every site. Off: the paper.
    normalise_map: bool = False


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
    # percentile of the healthy training slices' stage 1 maps that cuts stage 2's holes (None: mask.mask_percentile).
    # The inpainter should learn the holes inference will cut: a tuned operating point below the 99th percentile
    # inpaints ventricles and sulci that 99th-percentile holes rarely cover.
    hole_percentile: float | None = None
    # every this many steps of a stage its weights are also kept (checkpoints/stage<n>_step<k>.safetensors): the
    # points of a learning curve (benchmarks/learning_curve.py); None: only the best weights are kept
    snapshot_every: int | None = None


@dataclass(frozen=True)
class TuneConfig:
    """`phanes calibrate --tune`: operating point chosen by Dice on validation volumes with real lesion shapes.

    Off (the paper): both thresholds are healthy 99th percentiles. On: every `mask_percentiles` value gives a
    mask threshold (healthy validation m(x)); for each, the anomaly threshold (one of `anomaly_candidates`
    quantiles of s(x) on the lesioned volumes) and the minimum lesion size in `min_lesion_ml` that maximise
    Dice over the validation volumes with inserted lesions are kept. Never tuned on test data.
    """

    enabled: bool = False
    mask_percentiles: tuple[float, ...] = (85.0, 90.0, 95.0, 97.0, 98.0, 99.0, 99.5)
    min_lesion_ml: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
    anomaly_candidates: int = 40
    # each validation volume gets `copies` lesioned versions with `shapes_per_volume` real lesion masks each:
    # more lesions per pipeline pass (one pass costs ~10-25 s per volume for the CPU model)
    copies: int = 1
    shapes_per_volume: int = 2
    seed: int = 0
    # the tuned operating point must keep the healthy validation volumes' false-positive lesion volume (median
    # over volumes, mL) at or under this; the best lesion Dice among the points that do wins
    healthy_fp_budget_ml: float = 5.0
    # ... and their median number of false-positive components at or under this: a healthy brain should read as
    # one spot at most (on the shipped model's validation this cost 0.002 Dice and cut the false volume 4.8 -> 2.8 mL)
    healthy_fp_budget_components: float = 1.0


@dataclass(frozen=True)
class PhanesConfig:
    """Everything a run needs; serialised into every model bundle."""

    name: str = "paper"
    ra: RAConfig = field(default_factory=RAConfig)
    aot: AOTConfig = field(default_factory=AOTConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


T = TypeVar("T")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_Limit = tuple[Callable[[Any], bool], str]  # a test of a value and the words that describe the allowed range


def _percentile(low_open: bool = True, high_open: bool = False) -> _Limit:
    def check(v: float) -> bool:
        above = v > 0 if low_open else v >= 0
        return above and (v < 100 if high_open else v <= 100)
    return check, f"{'(' if low_open else '['}0, 100{')' if high_open else ']'}"


def _at_least(low: float) -> _Limit:
    return (lambda v: v >= low), f">= {low:g}"


_POSITIVE: _Limit = (lambda v: v > 0, "> 0")
_FRACTION: _Limit = (lambda v: 0 <= v <= 1, "in [0, 1]")
# allowed ranges by "section.key" (a tuple's limit applies to each element); types come from the dataclasses
LIMITS: dict[str, _Limit] = {
    "ra.channels": _at_least(1), "ra.latent_dim": _at_least(1),
    "aot.base_channels": _at_least(1), "aot.channels": _at_least(1), "aot.blocks": _at_least(1),
    "aot.rates": _at_least(1), "aot.disc_channels": _at_least(1),
    "preprocess.image_size": ((lambda v: 32 <= v <= 1024 and v % 32 == 0),
                              "a multiple of 32 from 32 to 1024 (5 halvings to the bottleneck)"),
    "preprocess.field_mm": ((lambda v: 64 <= v <= 512), "from 64 to 512 mm (a whole adult brain fits in 192)"),
    "preprocess.resolution_mm": ((lambda v: 0 <= v <= 8), "from 0 (no blur) to 8 mm"),
    "preprocess.percentile": _percentile(), "preprocess.min_brain_fraction": _FRACTION,
    "preprocess.slice_mode": ((lambda v: v in ("brain", "mid")), "'brain' or 'mid'"),
    "mask.clahe_tiles": _at_least(1), "mask.clahe_clip": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "mask.clahe_bins": _at_least(2),
    "mask.norm_percentile": _percentile(), "mask.lpips_sigma": _at_least(0), "mask.edge_margin_px": _at_least(0),
    "mask.dilation_sigma": _at_least(0),
    "mask.dilation_threshold": _FRACTION, "mask.mask_percentile": _percentile(high_open=True),
    "mask.anomaly_percentile": _percentile(high_open=True), "mask.per_image_percentile": _percentile(high_open=True),
    "train.seed": _at_least(0), "train.batch_size": _at_least(1), "train.checkpoint_every": _at_least(1),
    "train.snapshot_every": _at_least(1),
    "train.perceptual_size": _at_least(8), "train.random_masks_per_image": _at_least(1),
    "train.hole_percentile": _percentile(high_open=True),
    "stage.max_epochs": _at_least(1), "stage.max_steps": _at_least(1), "stage.lr": _POSITIVE,
    "stage.patience": _at_least(0), "stage.val_every": _at_least(1),
    "tune.mask_percentiles": _percentile(high_open=True), "tune.min_lesion_ml": _at_least(0),
    "tune.anomaly_candidates": _at_least(2), "tune.copies": _at_least(1), "tune.seed": _at_least(0),
    "tune.shapes_per_volume": _at_least(1), "tune.healthy_fp_budget_ml": _at_least(0),
    "tune.healthy_fp_budget_components": _at_least(0),
}
_SECTIONS = {RAConfig: "ra", AOTConfig: "aot", PreprocessConfig: "preprocess", MaskConfig: "mask",
             StageTrainConfig: "stage", TrainConfig: "train",
             TuneConfig: "tune"}
_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


MAX_SHOWN = 200  # characters of a config value an error message may quote

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 80, 80


def _shown(value: Any) -> str:
    """A config value as an error message quotes it: bounded, so an alias bomb or a megabyte string stays one
    short line (reprlib stops at a few levels and items instead of expanding the structure)."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _scalar(where: str, kind: type, value: Any) -> Any:
    """One value of a YAML/JSON config checked against its field's type; numbers must be finite."""
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML reads an exponent without a dot (lr: 5e-5) as a string
            value = float(value)
    accepted = (float, int) if kind is float else (kind,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
        expected = _TYPE_NAMES.get(kind, kind.__name__)
        raise ConfigError(f"{where}: expected {expected}, got {_shown(value)} ({type(value).__name__})")
    if kind is not float:
        return value
    number = float(value)  # type: ignore[arg-type]  # an int or float, checked above
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
    return number


def _checked(where: str, hint: Any, value: Any, limit: _Limit | None) -> Any:
    """A field value checked against its type hint (X, X | None, tuple[X, ...]) and its allowed range."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            element = get_args(hint)[0]
            raise ConfigError(f"{where}: expected a non-empty list, each {_TYPE_NAMES.get(element, element.__name__)}, "
                              f"got {_shown(value)}")
        return tuple(_checked(f"{where}[{i}]", get_args(hint)[0], v, limit) for i, v in enumerate(value))
    value = _scalar(where, hint, value)
    if limit is not None and not limit[0](value):
        raise ConfigError(f"{where}: {_shown(value)} is out of range; allowed: {limit[1]}")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(key)[:MAX_SHOWN] for key in data if key not in known)
    if unknown:
        shown = ", ".join(unknown[:10])[:MAX_SHOWN]
        raise ConfigError(f"{where}: unknown key(s) {shown}; known: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    section = _SECTIONS.get(cls, "")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _checked(f"{where}.{name}", hints[name], value, LIMITS.get(f"{section}.{name}"))
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> PhanesConfig:
    """Build a config from plain data (a parsed YAML file or a bundle's config.json)."""
    cfg = _build(PhanesConfig, data, "config")
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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({_shown(str(exc))})") from exc
    except RecursionError:  # PyYAML composes nested nodes recursively: 20,000 '[' exhaust the stack
        raise ConfigError(f"{path}: nested too deeply to be a phanes config") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
