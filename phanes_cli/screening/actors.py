"""The inference actor: holds one model on one device and runs the PHANES networks over volumes' slices.

One actor per GPU (or a few on CPU) loads the bundle once (from its folder, which every node must see,
and only if its hash is the one the driver verified); the driver streams volumes to it. The
actor only sees model-grid slices and returns model-grid maps; decoding and writing happen in CPU tasks.
It is a plain class so tests can use it without Ray; the engine wraps it with `ray.remote`. `pid` runs in
its own concurrency group, so it answers while `infer` is busy. The backend is chosen here, on the node that
runs it (`--backend auto` on a CPU: by the figures measured on this CPU at this actor's thread count, measured
at the bundle's first use here). Which backend it runs and why (one line), the candidates skipped with their
reasons (for the run record) and the refusals a user should act on (a tampered graph) are reported to the
driver by `backend_report`: Ray does not forward the actors' own output.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch

from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.pipeline import ModelMaps, infer_slices
from phanes_cli.errors import BundleError
from phanes_cli.run_folder.failures import Failure
from phanes_cli.runtimes.timing import TimedBackend
from phanes_cli.screening.tasks import InferenceResult, ModelSlices, describe, node_ip

if TYPE_CHECKING:
    from phanes_cli.core.backend import Backend


@dataclass
class ActorProfile:
    """Where an actor's time went (the run record's `ray.actor_profiles`): seconds inside `infer`, of which inside
    each network (the rest is pre/post-processing and copies), and idle between calls (no volume's slices ready:
    the actor waited on decoding); the threads it ran with, against the CPUs Ray gave it."""

    volumes: int = 0
    slices: int = 0
    infer_s: float = 0.0  # of which stage1_s, stage2_s and lpips_s (`profile`, on CPUs) inside the networks
    idle_s: float = 0.0
    torch_threads: int = 0
    affinity_cpus: int = 0


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
        from phanes_cli.runtimes.select import choose

        choice = choose(backend, bundle, torch.device(device), lpips_weights)
        self.backend: Backend = choice.backend
        # the networks' seconds, timed around each call; not on CUDA, where timing would synchronise every call
        self.timed = TimedBackend(choice.backend) if choice.backend.device.type == "cpu" else None
        self.choice = {"backend": choice.backend.name, "why": choice.why, "skipped": choice.skipped,
                       "fallbacks": choice.warnings}
        self.batch_size = batch_size
        self.keep: tuple[str, ...] = ("x_ph",) if pseudo_healthy else ()
        self.stats = ActorProfile(torch_threads=torch.get_num_threads(), affinity_cpus=len(os.sched_getaffinity(0)))
        self.last_end = time.perf_counter()

    @ray.method(concurrency_group="control")
    def profile(self) -> dict[str, Any]:
        """This actor's `ActorProfile` so far."""
        seconds = self.timed.seconds if self.timed is not None else {}
        return {**asdict(self.stats), **{f"{name}_s": s for name, s in seconds.items()}}

    @ray.method(concurrency_group="control")
    def backend_report(self) -> dict[str, Any]:
        """The backend this actor runs, the line saying why, every candidate skipped with its reason, and the
        warnings (`fallbacks`: refused artefacts `auto` fell back from)."""
        return self.choice

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The actor's process id (tests kill it to check recovery)."""
        return os.getpid()

    def infer(self, slices: ModelSlices | None) -> tuple[InferenceResult, ModelMaps | None]:
        """(N, 1, S, S) slices -> (record, maps); a failure (NaN output, out of memory) is in the record.

        `slices` is None when the volume's decode failed: nothing to run (the write stage reports the failure).
        """
        start = time.perf_counter()
        self.stats.idle_s += start - self.last_end
        if slices is None:
            self.last_end = time.perf_counter()
            return InferenceResult(None, 0.0, node_ip(), os.getpid(), self.backend.name), None
        try:
            maps = infer_slices(slices.slices, slices.brain, self.timed or self.backend, self.cfg, self.mask_threshold,
                                self.batch_size, self.keep)
            self.stats.volumes, self.stats.slices = self.stats.volumes + 1, self.stats.slices + len(slices.slices)
        except Exception as exc:  # the volume fails, the actor carries on
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            kind, message = describe(exc)
            failure = Failure("inference", kind, message)
            elapsed = self._ended(start)
            return InferenceResult(failure, elapsed, node_ip(), os.getpid(), self.backend.name), None
        return InferenceResult(None, self._ended(start), node_ip(), os.getpid(), self.backend.name), maps

    def _ended(self, start: float) -> float:
        """Seconds since `start`, added to the profile; the idle time runs from now."""
        self.last_end = time.perf_counter()
        self.stats.infer_s += self.last_end - start
        return self.last_end - start

