"""Resumable training checkpoints without pickle.

One file, `checkpoints/last.safetensors`, holds every tensor (weights, optimiser moments, torch RNG
states) and, in its safetensors metadata, the JSON of everything else (run progress, optimiser
hyper-parameters, Python and NumPy RNG states, the config). The file is replaced atomically, so a
kill at any moment leaves either the previous or the new checkpoint; `last.json` is a readable copy
of the metadata written right after it. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from phanes_cli.atomic import atomic_path, write_json
from phanes_cli.errors import BundleError

CHECKPOINT_FORMAT = 1
METADATA_KEY = "phanes_checkpoint"


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
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path}: unreadable training checkpoint ({exc}); delete it to start over") from exc
    if METADATA_KEY not in metadata:
        raise BundleError(f"{path}: not a phanes training checkpoint (no {METADATA_KEY} metadata)")
    meta = json.loads(metadata[METADATA_KEY])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BundleError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {CHECKPOINT_FORMAT})")
    return tensors, meta
