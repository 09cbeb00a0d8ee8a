"""The inference actor: holds one model on one device and runs the PHANES networks over volumes' slices.

One actor per GPU (or a few on CPU) loads the bundle once (from its folder, which every node must see,
and only if its hash is the one the driver verified); the driver streams volumes to it. The
actor only sees model-grid slices and returns model-grid maps; decoding and writing happen in CPU tasks.
It is a plain class so tests can use it without Ray; the engine wraps it with `ray.remote`. `pid` runs in
its own concurrency group, so it answers while `infer` is busy. Which backend `--backend` resolved to, and
why `auto` skipped a refused one (a failed export gate, a tampered graph), is reported to the driver by
`backend_report`: Ray does not forward the actors' own output.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import ray
import torch

from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.pipeline import ModelMaps, infer_slices
from phanes_cli.errors import BundleError
from phanes_cli.screening.commit import Failure
from phanes_cli.screening.tasks import InferenceResult, ModelSlices, describe, node_ip

if TYPE_CHECKING:
    from phanes_cli.core.backend import Backend


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
        self.mask_threshold = bundle.require_calibration().mask_threshold
        # imported in the actor only: the driver, which defines this class, never loads the networks
        from phanes_cli.runtimes.select import BackendFallbackWarning, choose_backend

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BackendFallbackWarning)
            self.backend: Backend = choose_backend(backend, bundle, torch.device(device), lpips_weights)
        self.fallbacks = [str(w.message) for w in caught if issubclass(w.category, BackendFallbackWarning)]
        self.batch_size = batch_size
        self.keep: tuple[str, ...] = ("x_ph",) if pseudo_healthy else ()

    @ray.method(concurrency_group="control")
    def backend_report(self) -> dict[str, Any]:
        """The backend this actor runs and the refused backends `auto` fell back from, with their reasons."""
        return {"backend": self.backend.name, "fallbacks": self.fallbacks}

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The actor's process id (tests kill it to check recovery)."""
        return os.getpid()

    def infer(self, slices: ModelSlices | None) -> tuple[InferenceResult, ModelMaps | None]:
        """(N, 1, S, S) slices -> (record, maps); a failure (NaN output, out of memory) is in the record.

        `slices` is None when the volume's decode failed: nothing to run (the write stage reports the failure).
        """
        start = time.perf_counter()
        if slices is None:
            return InferenceResult(None, 0.0, node_ip(), os.getpid(), self.backend.name), None
        try:
            maps = infer_slices(slices.slices, slices.brain, self.backend, self.cfg, self.mask_threshold,
                                self.batch_size, self.keep)
        except Exception as exc:  # the volume fails, the actor carries on
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            kind, message = describe(exc)
            failure = Failure("inference", kind, message)
            elapsed = time.perf_counter() - start
            return InferenceResult(failure, elapsed, node_ip(), os.getpid(), self.backend.name), None
        return InferenceResult(None, time.perf_counter() - start, node_ip(), os.getpid(), self.backend.name), maps

