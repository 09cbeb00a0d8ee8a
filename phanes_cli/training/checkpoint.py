"""Resumable training checkpoints without pickle.

One file, `checkpoints/last.safetensors`, holds every tensor (weights, optimiser moments, torch RNG
states) and, in its safetensors metadata, the JSON of everything else (run progress, optimiser
hyper-parameters, Python and NumPy RNG states, the config). The file is replaced atomically, so a
kill at any moment leaves either the previous or the new checkpoint; `last.json` is a readable copy
of the metadata written right after it. Nothing is ever unpickled. The best weights of each stage by
validation go to `checkpoints/best_stage<N>.safetensors`, the same way.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from phanes_cli.config import PhanesConfig
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.infra.atomic import atomic_path, write_json

CHECKPOINT_FORMAT = 1
METADATA_KEY = "phanes_checkpoint"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.safetensors"
ARCHITECTURE_KEYS = ("ra", "aot", "preprocess")  # a checkpoint resumes only into the same network shapes


@dataclass
class RunState:
    """Progress of a run; everything a resumed run needs besides tensors (stored as JSON)."""

    stage: int = 1
    epoch: int = 0  # completed epochs of the current stage
    step: int = 0  # optimisation steps of the current stage
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # validations since the last improvement
    seconds: float = 0.0  # training wall time over all sessions
    stage2_mask_threshold: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)  # one summary per finished stage

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_val"] = None if not math.isfinite(self.best_val) else self.best_val
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        data = dict(data)
        data["best_val"] = math.inf if data.get("best_val") is None else float(data["best_val"])
        return cls(**data)


def flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (`optim.<name>.<param>.<key>`) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`: a state dict for `optimizer.load_state_dict`."""
    per_param: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for full_key, value in tensors.items():
        if full_key.startswith(prefix):
            index, key = full_key[len(prefix):].split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(entries)
    return {"state": per_param, "param_groups": meta["param_groups"]}


def rng_snapshot(sampler: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random stream of a run: torch (CPU, CUDA, the run's sampler) as tensors, Python/NumPy as JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.sampler": sampler.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], sampler: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    sampler.set_state(tensors["rng.sampler"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def module_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write tensors + JSON metadata, then the readable JSON copy beside it."""
    payload = {"format": CHECKPOINT_FORMAT, **meta}
    text = json.dumps(payload, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    write_json(path.with_suffix(".json"), payload)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint` (safetensors only: no code is executed)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # safe_open handles are not iterable
            tensors = {key: handle.get_tensor(key) for key in names}
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path}: unreadable training checkpoint ({exc}); delete it to start over") from exc
    if METADATA_KEY not in metadata:
        raise BundleError(f"{path}: not a phanes training checkpoint (no {METADATA_KEY} metadata)")
    meta = json.loads(metadata[METADATA_KEY])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BundleError(f"{path}: checkpoint format {meta.get('format')} is not supported "
                          f"(expected {CHECKPOINT_FORMAT})")
    return tensors, meta


def save_run(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             sampler: torch.Generator, state: RunState, config: PhanesConfig) -> None:
    """Checkpoint a whole run: named modules, optimisers, every random stream, progress and config."""
    tensors = {k: v for name, module in modules.items() for k, v in module_tensors(name, module).items()}
    optim_meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        opt_tensors, optim_meta[name] = flatten_optimizer(name, opt)
        tensors.update(opt_tensors)
    rng_tensors, rng_meta = rng_snapshot(sampler)
    tensors.update(rng_tensors)
    save_checkpoint(path, tensors, {"state": state.to_json(), "optimizers": optim_meta, "rng": rng_meta,
                                    "config": config.to_dict()})


def load_run(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             sampler: torch.Generator, config: PhanesConfig) -> RunState:
    """Restore what `save_run` wrote into the given modules, optimisers and sampler; returns the progress."""
    tensors, meta = load_checkpoint(path)
    changed = [k for k in ARCHITECTURE_KEYS if meta["config"].get(k) != config.to_dict()[k]]
    if changed:
        raise ConfigError(f"{path}: the checkpoint was trained with different {', '.join(changed)} settings; "
                          "resume with the original config or train into another --out folder")
    for name, module in modules.items():
        module.load_state_dict(module_state(name, tensors))
    for name, opt in optimizers.items():
        opt.load_state_dict(unflatten_optimizer(name, tensors, meta["optimizers"][name]))
    rng_restore(tensors, meta["rng"], sampler)
    return RunState.from_json(meta["state"])


def save_weights(path: Path, modules: dict[str, nn.Module]) -> None:
    """Atomically write the weights of named modules (a stage's best weights)."""
    tensors = {k: v for name, module in modules.items() for k, v in module_tensors(name, module).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(path: Path, modules: dict[str, nn.Module]) -> None:
    """Load weights written by `save_weights` back into the same named modules."""
    tensors = load_file(str(path))
    for name, module in modules.items():
        module.load_state_dict(module_state(name, tensors))
