"""The options of one screening run (`phanes screen` flags) and their validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS
from phanes_cli.errors import ConfigError
from phanes_cli.inputs.bids import BidsQuery
from phanes_cli.inputs.brain_masks import check_mode
from phanes_cli.run_folder.layout import OUTPUT_KINDS
from phanes_cli.runtimes import validate_backend_name
from phanes_cli.screening.bids_derivative import check_layout


def check_batch_size(value: object) -> int:
    """The one check of a batch size of slices, for `phanes screen` and `phanes_cli.predict` alike: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch size must be a whole number of slices >= 1, got {value!r}")
    return value


@dataclass
class ScreenOptions:
    """Everything `phanes screen` takes besides INPUTS (`session` explains address and node_ip)."""

    bundle: Path
    out: Path
    address: str | None = None
    connect_timeout: float = 60.0  # seconds to join the cluster at `address` (session.py)
    num_actors: int | None = None  # default: one per GPU (with gpus_per_actor), else plan.cpu_plan of the nodes' CPUs
    cpus_per_actor: float | None = None  # CPUs Ray reserves per actor; default: 1 on GPUs, else plan.cpu_plan
    threads_per_actor: int | None = None  # torch / ONNX Runtime threads per actor; default: plan.cpu_plan (1 on GPUs)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    batch_size: int = 32
    backend: str = "torch"
    outputs: frozenset[str] = frozenset({"anomaly", "lesion_mask"})
    resume: bool = True
    overwrite: bool = False
    quiet: bool = False
    log_jsonl: Path | None = None
    max_voxels: int = DEFAULT_MAX_VOXELS
    lpips_weights: str | None = None
    max_in_flight: int | None = None  # default: 4 per actor, at least 4
    node_ip: str | None = None
    object_store_mb: int | None = None  # local instance only; None: Ray's default
    skull_strip: str = "auto"  # auto | always | never (inputs/brain_masks.py); the model runs in the decode tasks
    layout: str = "default"  # default | bids (bids_derivative.py: OUT as a BIDS-derivatives dataset)
    bids: BidsQuery = field(default_factory=BidsQuery)  # which images of a BIDS root input to take
    min_lesion_ml: float | None = None  # lesion components under this are dropped; default: the bundle's calibration
    exclude: Path | None = None  # inputs are never taken from here besides OUT (`phanes bids`: the whole OUTPUT_DIR)

    def validate(self) -> None:
        unknown = sorted(set(self.outputs) - set(OUTPUT_KINDS))
        if unknown:
            raise ConfigError(f"unknown output(s) {', '.join(unknown)}; choose from {', '.join(OUTPUT_KINDS)}")
        if not (math.isfinite(self.connect_timeout) and self.connect_timeout > 0):
            raise ConfigError(f"connect timeout must be a number of seconds > 0, got {self.connect_timeout}")
        check_batch_size(self.batch_size)
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"number of actors must be at least 1, got {self.num_actors}")
        if (self.cpus_per_actor or 0) < 0 or (self.gpus_per_actor or 0) < 0:
            raise ConfigError("CPUs and GPUs per actor cannot be negative")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError(f"threads per actor must be at least 1, got {self.threads_per_actor}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"max in flight must be at least 1, got {self.max_in_flight}")
        validate_backend_name(self.backend)
        check_mode(self.skull_strip)
        check_layout(self.layout)
        if self.min_lesion_ml is not None and not (math.isfinite(self.min_lesion_ml) and self.min_lesion_ml >= 0):
            raise ConfigError(f"minimum lesion size must be a number >= 0 (mL), got {self.min_lesion_ml}")

    @staticmethod
    def gpus_for_device(device: str, gpus_per_actor: float | None) -> float | None:
        """`--device` in GPUs per actor: cpu -> 0, cuda -> at least a share of one, auto -> as given (or planned)."""
        if device == "cpu":
            if gpus_per_actor:
                raise ConfigError(f"--device cpu contradicts --gpus-per-actor {gpus_per_actor:g}")
            return 0.0
        if device == "cuda":
            if gpus_per_actor == 0:
                raise ConfigError("--device cuda contradicts --gpus-per-actor 0")
            return gpus_per_actor if gpus_per_actor is not None else 1.0
        if device != "auto":
            raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
        return gpus_per_actor

    def to_json(self) -> dict[str, Any]:
        """The options as JSON values, for the run manifest."""
        return {k: (sorted(v) if isinstance(v, frozenset) else str(v) if isinstance(v, Path) else v)
                for k, v in asdict(self).items()}
