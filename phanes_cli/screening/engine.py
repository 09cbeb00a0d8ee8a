"""The screening driver: streams a cohort through Ray with bounded memory, resumable at any point.

Per volume: a CPU task decodes and preprocesses it (`tasks.decode_volume`), an inference actor runs the
networks over its slices (`actors.InferenceActor`), a CPU task maps the results back to the input's
space, measures lesions and commits the files (`tasks.write_volume`). The driver only passes object
references along and reads small records, keeping at most `max_in_flight` volumes in the pipeline, so its
memory does not grow with the cohort.

Ray: `address=None` starts a private local instance and shuts it down at the end (no process is left);
`"auto"`, `"host:port"` or `"ray://host:port"` joins a running cluster and only disconnects. If the
calling process already has Ray initialised, that session is used as it is. On a multi-node cluster the
inputs and OUT must be on a file system every node sees at the same paths. `node_ip` sets the address
this driver (and a local instance) registers under; None lets Ray choose, which suits a laptop; tests on
a machine without usable networking pass a loopback address such as 127.0.0.2.

Faults: an inference actor that dies is restarted by Ray and its in-flight calls are retried
(`max_restarts`, `max_task_retries`); when a call still fails after that, the actor is replaced by a
fresh one and the volume is tried once more there, then recorded as a failure. A task whose worker crashes is retried by Ray, then recorded as failed.
Errors inside a stage (unreadable file, NaN output, out of memory) fail only that volume.

Resume: a volume is skipped when its done marker matches (see `outputs`). Failures are retried on the
next run, except errors of the input file itself (unreadable, not 3D, NaN voxels...) while that file is
unchanged and the bundle is the same; those stay failed and count as failed in the summary and exit
status. `overwrite` removes the previous outputs of the run's ids first and redoes everything.
"""

from __future__ import annotations

import fcntl
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
from ray.exceptions import RayActorError

from phanes_cli.bundle import Bundle, load_bundle
from phanes_cli.errors import ConfigError, PhanesError
from phanes_cli.inputs import resolve_inputs
from phanes_cli.manifest import ManifestRow
from phanes_cli.screening.actors import InferenceActor, resolve_backend
from phanes_cli.screening.outputs import (
    OUTPUT_KINDS, Failure, OutputLayout, consolidate, input_signature, is_done, previous_failure, record_failure,
)
from phanes_cli.screening.report import Counts, JsonLog, ProgressDisplay, now_iso, print_summary, write_run_manifest
from phanes_cli.screening.tasks import DecodeResult, InferenceResult, WriteJob, WriteResult, decode_volume, describe, write_volume
from phanes_cli.volume_io import DEFAULT_MAX_VOXELS

EXIT_OK = 0
EXIT_SOME_FAILED = 3
ACTOR_MAX_RESTARTS = 3
ACTOR_TASK_RETRIES = 2
INFERENCE_ATTEMPTS = 2  # driver-level: a volume whose actor died for good is tried once more on a fresh actor
TASK_RETRIES = 2
INFERENCE_ATTEMPTS = 2  # driver-level: a volume whose actor died for good is tried once more on a fresh actor


@dataclass
class ScreenOptions:
    """Everything `phanes screen` takes besides INPUTS (see the module docstring for address/node_ip)."""

    bundle: Path
    out: Path
    address: str | None = None
    num_actors: int | None = None  # default: one per GPU (with gpus_per_actor), else CPUs // (2 * cpus_per_actor)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    batch_size: int = 32
    backend: str = "torch"
    outputs: frozenset[str] = frozenset({"anomaly", "mask"})
    resume: bool = True
    overwrite: bool = False
    quiet: bool = False
    log_jsonl: Path | None = None
    max_voxels: int = DEFAULT_MAX_VOXELS
    lpips_weights: str | None = None
    max_in_flight: int | None = None  # default: 4 per actor, at least 4
    node_ip: str | None = None
    object_store_mb: int | None = None  # local instance only; None: Ray's default

    def validate(self) -> None:
        unknown = sorted(set(self.outputs) - set(OUTPUT_KINDS))
        if unknown:
            raise ConfigError(f"unknown output(s) {', '.join(unknown)}; choose from {', '.join(OUTPUT_KINDS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"number of actors must be at least 1, got {self.num_actors}")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("CPUs and GPUs per actor cannot be negative")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"max in flight must be at least 1, got {self.max_in_flight}")
        resolve_backend(self.backend)


@dataclass
class ScreenSummary:
    """Counts of one run. `failed` includes earlier input failures that stand; `skipped` were done before."""

    total: int
    done: int
    failed: int
    skipped: int
    out: Path
    seconds: float

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.failed == 0 else EXIT_SOME_FAILED


@contextmanager
def _run_lock(layout: OutputLayout) -> Iterator[None]:
    """One run per OUT at a time; the OS drops the lock when the process dies, even on SIGKILL."""
    handle = open(layout.lock, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PhanesError(f"{layout.root}: another `phanes screen` is writing to this folder") from exc
        yield
    finally:
        handle.close()


@contextmanager
def _ray_session(options: ScreenOptions) -> Iterator[None]:
    """Use the caller's Ray session, join a cluster, or start (and later stop) a local instance."""
    if ray.is_initialized():
        yield
        return
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR if options.quiet else logging.WARNING}
    if options.node_ip is not None:
        common["_node_ip_address"] = options.node_ip
    if options.address is None:
        extra = {} if options.object_store_mb is None else {"object_store_memory": options.object_store_mb * 2**20}
        ray.init(include_dashboard=False, **common, **extra)
    else:
        ray.init(address=options.address, **common)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class _ActorPlan:
    count: int
    cpus: float
    gpus: float


def _plan_actors(options: ScreenOptions) -> _ActorPlan:
    """Actor count and resources from the options and what the cluster has; refuse plans that cannot run."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    per_gpu = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if options.num_actors is not None:
        count = options.num_actors
    elif per_gpu > 0:
        count = max(1, int(gpus // per_gpu))
    else:
        count = max(1, int(cpus // (2 * max(options.cpus_per_actor, 0.5))))
    if per_gpu * count > gpus + 1e-9:
        raise ConfigError(f"{count} actor(s) x {per_gpu} GPU need {per_gpu * count:g} GPUs; the cluster has {gpus:g}")
    if cpus - count * options.cpus_per_actor < 1:
        raise ConfigError(f"{count} actor(s) x {options.cpus_per_actor:g} CPU leave no CPU for decoding and writing "
                          f"(the cluster has {cpus:g}); lower --actors or --cpus-per-actor")
    return _ActorPlan(count=count, cpus=options.cpus_per_actor, gpus=per_gpu)


@dataclass
class _Flight:
    """One volume moving through the pipeline; holds only object references and small records."""

    row: ManifestRow
    stage: str = "decode"
    slices: Any = None
    context: Any = None
    maps: Any = None
    decode: DecodeResult | None = None
    actor: int = -1
    generation: int = 0  # of the actor at `actor` when the call was made
    attempts: int = 0


@dataclass
class _Pipeline:
    """The streaming loop: decode -> inference (least-loaded actor) -> write, at most `limit` in flight."""

    options: ScreenOptions
    bundle: Bundle
    backend: str
    layout: OutputLayout
    plan: _ActorPlan
    counts: Counts
    log: JsonLog
    display: ProgressDisplay
    run_id: str
    actors: list[Any] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    load: list[int] = field(default_factory=list)
    pending: dict[Any, _Flight] = field(default_factory=dict)
    replacements: int = 0
    peak_in_flight: int = 0

    def __post_init__(self) -> None:
        self.decode_fn = ray.remote(decode_volume).options(num_returns=3, num_cpus=1, max_retries=TASK_RETRIES,
                                                            scheduling_strategy="SPREAD")
        self.write_fn = ray.remote(write_volume).options(num_cpus=1, max_retries=TASK_RETRIES)
        self.actor_cls = ray.remote(concurrency_groups={"control": 1})(InferenceActor)

    def _new_actor(self, index: int) -> Any:
        device = "cuda" if self.plan.gpus > 0 else "cpu"
        return self.actor_cls.options(
            num_cpus=self.plan.cpus, num_gpus=self.plan.gpus, max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES, name=f"phanes-infer-{self.run_id}-{index}-{self.replacements}",
            scheduling_strategy="SPREAD",
        ).remote(str(self.bundle.path.absolute()), self.bundle.hash, self.backend, device, max(1, int(self.plan.cpus)), self.options.batch_size,
                 "pseudohealthy" in self.options.outputs, self.options.lpips_weights)

    def start_actors(self) -> None:
        self.actors = [self._new_actor(i) for i in range(self.plan.count)]
        self.generations = [0] * self.plan.count
        self.load = [0] * self.plan.count

    def wait_actors(self) -> None:
        try:
            ray.get([a.pid.remote() for a in self.actors])
        except RayActorError as exc:
            raise PhanesError(f"the inference actors could not start: {_short(exc)}") from exc

    def stop_actors(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def run(self, rows: Iterator[ManifestRow], limit: int) -> None:
        exhausted = False
        while True:
            while not exhausted and len(self.pending) < limit:
                row = next(rows, None)
                if row is None:
                    exhausted = True
                else:
                    self._submit_decode(_Flight(row))
            self.peak_in_flight = max(self.peak_in_flight, len(self.pending))
            if not self.pending:
                return
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            for ref in ready:
                self._advance(ref, self.pending.pop(ref))
            self.display.refresh()

    def _submit_decode(self, flight: _Flight) -> None:
        info, flight.slices, flight.context = self.decode_fn.remote(flight.row, self.bundle.config.preprocess,
                                                                    self.options.max_voxels)
        flight.stage = "decode"
        self.pending[info] = flight

    def _submit_inference(self, flight: _Flight) -> None:
        flight.actor = min(range(len(self.actors)), key=lambda i: self.load[i])
        self.load[flight.actor] += 1
        flight.generation, flight.attempts = self.generations[flight.actor], flight.attempts + 1
        info, flight.maps = self.actors[flight.actor].infer.options(num_returns=2).remote(flight.slices)
        flight.stage = "inference"
        self.pending[info] = flight

    def _advance(self, ref: Any, flight: _Flight) -> None:
        if flight.stage == "decode":
            try:
                decoded: DecodeResult = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died after its retries
                return self._fail(flight, Failure("decode", *describe_ray(exc)))
            if decoded.failure is not None:
                return self._fail(flight, decoded.failure)
            flight.decode = decoded
            return self._submit_inference(flight)
        if flight.stage == "inference":
            self.load[flight.actor] -= 1
            try:
                inferred: InferenceResult = ray.get(ref)
            except RayActorError as exc:
                if self.generations[flight.actor] == flight.generation:
                    self._replace_actor(flight.actor, exc)
                if flight.attempts < INFERENCE_ATTEMPTS:
                    return self._submit_inference(flight)
                return self._fail(flight, Failure("inference", *describe_ray(exc)))
            except Exception as exc:  # noqa: BLE001
                return self._fail(flight, Failure("inference", *describe_ray(exc)))
            if inferred.failure is not None:
                return self._fail(flight, inferred.failure)
            job = WriteJob(row=flight.row, out=self.layout.root, outputs=frozenset(self.options.outputs),
                           calibration=self.bundle.require_calibration(), backend=self.backend,
                           bundle_hash=self.bundle.hash, decode=flight.decode, inference=inferred)  # type: ignore[arg-type]
            write_ref = self.write_fn.remote(job, flight.context, flight.maps)
            flight.slices, flight.stage = None, "write"
            self.pending[write_ref] = flight
            return None
        try:
            written: WriteResult = ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            return self._fail(flight, Failure("write", *describe_ray(exc)))
        if written.failure is not None:
            return self._fail(flight, written.failure)
        self.counts.done += 1
        self.log.event("volume", id=flight.row.id, status="ok", lesion_count=written.lesion_count,
                       lesion_burden_ml=written.lesion_burden_ml)
        return None

    def _replace_actor(self, index: int, exc: BaseException) -> None:
        """An actor call failed after Ray's restarts and retries: put a fresh actor in its place."""
        if self.replacements >= 2 * self.plan.count:
            raise PhanesError(f"inference actors keep dying ({self.replacements} replaced); last error: {_short(exc)}")
        self.replacements += 1
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new_actor(index)
        self.generations[index] += 1
        self.log.event("actor_replaced", index=index, error=_short(exc))

    def _fail(self, flight: _Flight, failure: Failure) -> None:
        row = flight.row
        size, mtime = input_signature(row.image)
        record_failure(self.layout, row.id, {
            "id": row.id, "path": str(row.image), "stage": failure.stage, "error_type": failure.error_type,
            "message": failure.message, "retry_on_resume": failure.retry_on_resume, "input_size": size,
            "input_mtime_ns": mtime, "bundle_hash": self.bundle.hash,
        })
        self.counts.failed += 1
        self.log.event("volume", id=row.id, status="failed", stage=failure.stage, error_type=failure.error_type,
                       message=failure.message)


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__))[:2000]


def describe_ray(exc: BaseException) -> tuple[str, str]:
    """(error type, message) for an exception raised by Ray itself (a dead worker or actor)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, RayActorError):
        return describe(cause)
    return type(exc).__name__, _short(exc)


def _plan_volumes(rows: list[ManifestRow], layout: OutputLayout, options: ScreenOptions, bundle_hash: str
                  ) -> tuple[list[ManifestRow], int, int]:
    """(volumes to run, number already done, number of standing input failures)."""
    if options.overwrite:
        for row in rows:
            layout.clear(row.id)
        return rows, 0, 0
    if not options.resume:
        return rows, 0, 0
    todo, done, standing = [], 0, 0
    for row in rows:
        if is_done(layout, row.id, row.image, bundle_hash, options.outputs):
            done += 1
        elif previous_failure(layout, row.id, row.image, bundle_hash) is not None:
            standing += 1
        else:
            todo.append(row)
    return todo, done, standing


def screen(inputs: list[str], options: ScreenOptions) -> ScreenSummary:
    """Screen every volume named by INPUTS into `options.out`; see the module docstring for the guarantees."""
    started, started_iso = time.monotonic(), now_iso()
    options.validate()
    backend = resolve_backend(options.backend)
    bundle = load_bundle(options.bundle)
    calibration = bundle.require_calibration()
    rows = resolve_inputs(inputs)
    layout = OutputLayout(Path(options.out))
    layout.root.mkdir(parents=True, exist_ok=True)
    log = JsonLog(options.log_jsonl)
    with _run_lock(layout):
        layout.ensure()
        layout.remove_temporaries()
        todo, skipped, standing = _plan_volumes(rows, layout, options, bundle.hash)
        counts = Counts(total=len(rows), failed=standing, skipped=skipped)
        manifest: dict[str, Any] = {
            "run_id": uuid.uuid4().hex[:12], "status": "running", "started": started_iso, "finished": None,
            "inputs": list(inputs), "bundle": {"path": str(bundle.path), "hash": bundle.hash,
                                               "calibration": calibration.to_dict()},
            "options": {k: (sorted(v) if isinstance(v, frozenset) else str(v) if isinstance(v, Path) else v)
                        for k, v in asdict(options).items()},
            "backend": backend, "counts": {}, "ray": {},
        }
        write_run_manifest(layout.run_manifest, manifest)
        log.event("start", total=len(rows), todo=len(todo), skipped=skipped, standing_failures=standing,
                  out=str(layout.root), bundle_hash=bundle.hash)
        display = ProgressDisplay(counts, options.quiet)
        status = "aborted"
        try:
            if todo:
                with _ray_session(options), display:
                    plan = _plan_actors(options)
                    limit = options.max_in_flight or max(4, 4 * plan.count)
                    manifest["ray"] = {"address": options.address, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                                       "actors": plan.count, "cpus_per_actor": plan.cpus, "gpus_per_actor": plan.gpus,
                                       "max_in_flight": limit}
                    pipeline = _Pipeline(options, bundle, backend, layout, plan, counts, log, display, manifest["run_id"])
                    pipeline.start_actors()
                    try:
                        pipeline.wait_actors()
                        pipeline.run(iter(todo), limit)
                    finally:
                        pipeline.stop_actors()
                        manifest["ray"].update(peak_in_flight=pipeline.peak_in_flight,
                                               actors_replaced=pipeline.replacements)
            status = "finished"
        finally:
            tables = consolidate(layout)
            seconds = time.monotonic() - started
            manifest.update(status=status, finished=now_iso(), seconds=seconds, tables=tables,
                            counts={"total": counts.total, "done": counts.done, "failed": counts.failed,
                                    "skipped": counts.skipped})
            write_run_manifest(layout.run_manifest, manifest)
            log.event("end", status=status, total=counts.total, done=counts.done, failed=counts.failed,
                      skipped=counts.skipped, seconds=seconds)
            log.close()
    summary = ScreenSummary(total=counts.total, done=counts.done, failed=counts.failed, skipped=counts.skipped,
                            out=layout.root, seconds=seconds)
    if not options.quiet:
        ids = {row.id for row in rows}
        failures = [r for r in _read_failures(layout) if r["id"] in ids]
        print_summary(display.console, counts, seconds, layout.root, failures)
    return summary


def _read_failures(layout: OutputLayout) -> list[dict[str, Any]]:
    path = layout.table("failures")
    return pq.read_table(path).to_pylist() if path.is_file() else []

