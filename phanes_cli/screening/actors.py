"""The inference actor: holds one model on one device and runs the PHANES networks over volumes' slices.

One actor per GPU (or a few on CPU) loads the bundle once (from its folder, which every node must see,
and only if its hash is the one the driver verified); the driver streams volumes to it. The
actor only sees model-grid slices and returns model-grid maps; decoding and writing happen in CPU tasks.
It is a plain class so tests can use it without Ray; the engine wraps it with `ray.remote`. `pid` runs in
its own concurrency group, so it answers while `infer` is busy.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from phanes_cli.backends import Backend, TorchBackend
from phanes_cli.bundle import Bundle, load_bundle
from phanes_cli.errors import BundleError, ConfigError
from phanes_cli.pipeline import run_slices
from phanes_cli.screening.outputs import Failure
from phanes_cli.screening.tasks import InferenceResult, ModelMaps, ModelSlices, describe, node_ip

BACKENDS = ("torch",)


def resolve_backend(name: str) -> str:
    """Validate a --backend value; 'auto' picks the best available one (torch for now)."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r} is not available; choose one of: auto, {', '.join(BACKENDS)}")
    return name


def make_backend(name: str, bundle: Bundle, device: torch.device, lpips_weights: str | None) -> Backend:
    if resolve_backend(name) == "torch":
        return TorchBackend(bundle.networks(lpips_weights), device)
    raise ConfigError(f"backend {name!r} is not available")


class InferenceActor:
    """Runs stage 1, the mask, stage 2 and the anomaly map over a volume's slices, `batch_size` at a time."""

    def __init__(self, bundle_path: str, bundle_hash: str, backend: str, device: str, threads: int, batch_size: int,
                 pseudo_healthy: bool, lpips_weights: str | None) -> None:
        torch.set_num_threads(max(1, threads))
        bundle = load_bundle(bundle_path)
        if bundle.hash != bundle_hash:
            raise BundleError(f"{bundle_path}: bundle changed since the run started (hash {bundle.hash[:12]}, "
                              f"expected {bundle_hash[:12]})")
        self.cfg = bundle.config
        self.calibration = bundle.require_calibration()
        self.backend = make_backend(backend, bundle, torch.device(device), lpips_weights)
        self.batch_size = batch_size
        self.pseudo_healthy = pseudo_healthy

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The actor's process id (tests kill it to check recovery)."""
        return os.getpid()

    def infer(self, slices: ModelSlices) -> tuple[InferenceResult, ModelMaps | None]:
        """(N, 1, S, S) slices -> (record, maps); a failure (NaN output, out of memory) is in the record."""
        start = time.perf_counter()
        try:
            maps = self._run(slices)
        except Exception as exc:  # noqa: BLE001 - the volume fails, the actor carries on
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            kind, message = describe(exc)
            return InferenceResult(Failure("inference", kind, message), time.perf_counter() - start, node_ip(), os.getpid()), None
        return InferenceResult(None, time.perf_counter() - start, node_ip(), os.getpid()), maps

    def _run(self, slices: ModelSlices) -> ModelMaps:
        x = torch.tensor(slices.slices)
        brain = torch.tensor(slices.brain)
        anomaly, x_ph, mask = [], [], []
        for begin in range(0, x.shape[0], self.batch_size):
            part = slice(begin, begin + self.batch_size)
            out = run_slices(x[part], brain[part], self.backend, self.cfg, self.calibration)
            checked = [("anomaly", out.anomaly)] + ([("pseudo-healthy", out.x_ph)] if self.pseudo_healthy else [])
            for name, value in checked:
                if not torch.isfinite(value).all():
                    raise FloatingPointError(
                        f"non-finite values in the {name} map (slices {begin}..{begin + value.shape[0] - 1} of {x.shape[0]})")
            anomaly.append(out.anomaly.float().cpu().numpy())
            if self.pseudo_healthy:
                x_ph.append(out.x_ph.float().cpu().numpy())
                mask.append(out.mask.cpu().numpy() > 0.5)
        empty = np.zeros((0, *x.shape[1:]), dtype=np.float32)
        return ModelMaps(
            anomaly=np.concatenate(anomaly) if anomaly else empty,
            pseudo_healthy=(np.concatenate(x_ph) if x_ph else empty) if self.pseudo_healthy else None,
            inpaint_mask=(np.concatenate(mask) if mask else empty.astype(bool)) if self.pseudo_healthy else None,
        )
