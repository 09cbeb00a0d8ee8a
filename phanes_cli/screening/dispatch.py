"""The streaming loop: per volume a decode task, a call on an inference actor and a write task, chained.

The driver only passes object references along and reads small records, keeping at most
`max_in_flight` volumes in the pipeline, so its memory does not grow with the cohort. Ray's own actor
pools do not fit this: `ray.util.ActorPool` submits a call only when an actor is idle and its input is
ready (here the call is chained behind the decode task and queued on the actor while it works on the
previous volume), and returns a dead actor to the pool instead of replacing it.

Faults: an inference actor that dies is restarted by Ray and its in-flight calls are retried
(`max_restarts`, `max_task_retries`); when a call still fails after that, the actor is replaced by a
fresh one and the volume is tried once more there, then recorded as a failure. A task whose worker
crashes is retried by Ray, then recorded as failed. Errors inside a stage (unreadable file, NaN output,
out of memory) fail only that volume: the stages return them as a `Failure`, written to the failures table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from phanes_cli.core.bundle import Bundle
from phanes_cli.errors import PhanesError, raise_if_interrupted
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.inputs.quality import FLAGS
from phanes_cli.run_folder.commit import input_signature, record_failure
from phanes_cli.run_folder.failures import Failure
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import manifest_columns
from phanes_cli.screening.actors import InferenceActor
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.plan import ActorPlan
from phanes_cli.screening.run_log import Counts, JsonLog, ProgressDisplay
from phanes_cli.screening.tasks import WriteJob, WriteResult, decode_volume, describe, write_volume

ACTOR_MAX_RESTARTS = 3
ACTOR_TASK_RETRIES = 2
TASK_RETRIES = 2
INFERENCE_ATTEMPTS = 2  # a volume whose actor died for good is tried once more on a fresh actor


def short_error(exc: BaseException) -> str:
    """The line of a (possibly multi-line, remote) error message that names the error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__))[:2000]


def describe_ray(exc: BaseException) -> tuple[str, str]:
    """(error type, message) for an exception raised by Ray itself (a dead worker or actor)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, RayActorError):
        return describe(cause)
    return type(exc).__name__, short_error(exc)


class Actors:
    """The inference actors: the least loaded one takes the next volume; one that died for good is replaced."""

    def __init__(self, options: ScreenOptions, bundle: Bundle, backend: str, plan: ActorPlan, run_id: str,
                 log: JsonLog) -> None:
        self.options, self.bundle, self.backend, self.plan = options, bundle, backend, plan
        self.run_id, self.log = run_id, log
        # `pid` runs in its own group so it answers while `infer` is busy; Ray's typed overloads omit the option
        # out of order: a call runs once its slices exist, not behind a volume that is still decoding
        self.cls = ray.remote(concurrency_groups={"control": 1},  # type: ignore[call-overload]
                              allow_out_of_order_execution=True)(InferenceActor)
        self.replacements = 0
        self.handles = [self._new(i) for i in range(plan.count)]
        self.generations = [0] * plan.count  # bumped on replacement, so a late error of the old actor is ignored
        self.load = [0] * plan.count

    def _new(self, index: int) -> Any:
        return self.cls.options(
            num_cpus=self.plan.cpus, num_gpus=self.plan.gpus, max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES, scheduling_strategy="SPREAD",
            name=f"phanes-infer-{self.run_id}-{index}-{self.replacements}",
        ).remote(str(self.bundle.path.absolute()), self.bundle.hash, self.backend,
                 "cuda" if self.plan.gpus > 0 else "cpu", self.plan.threads, self.options.batch_size,
                 "pseudohealthy" in self.options.outputs, self.options.lpips_weights)

    def wait_ready(self) -> list[dict[str, Any]]:
        """Wait for every actor to load its backend and log which one it runs; returns the distinct reports
        (backend, why, skipped, fallbacks: `InferenceActor.backend_report`)."""
        try:
            reports = ray.get([a.backend_report.remote() for a in self.handles])
        except RayActorError as exc:
            raise PhanesError(f"the inference actors could not start: {short_error(exc)}") from exc
        for index, report in enumerate(reports):
            self.log.event("backend", index=index, **report)
        distinct: list[dict[str, Any]] = []
        for report in reports:
            if report not in distinct:
                distinct.append(report)
        return distinct

    def profiles(self) -> list[dict[str, Any]]:
        """Each live actor's `ActorProfile` (where its time went); an actor that does not answer is left out."""
        found = []
        for actor in self.handles:
            try:
                found.append(ray.get(actor.profile.remote(), timeout=10))
            except Exception:  # a dead or stuck actor only lacks its profile in the record
                continue
        return found

    def stop(self) -> None:
        for actor in self.handles:
            ray.kill(actor, no_restart=True)

    def least_loaded(self) -> int:
        return min(range(len(self.handles)), key=lambda i: self.load[i])

    def replace(self, index: int, exc: BaseException) -> None:
        """An actor call failed after Ray's restarts and retries: put a fresh actor in its place."""
        if self.replacements >= 2 * self.plan.count:
            raise PhanesError(f"inference actors keep dying ({self.replacements} replaced); "
                              f"last error: {short_error(exc)}")
        self.replacements += 1
        ray.kill(self.handles[index], no_restart=True)
        self.handles[index] = self._new(index)
        self.generations[index] += 1
        self.log.event("actor_replaced", index=index, error=short_error(exc))


@dataclass
class Flight:
    """One volume moving through the pipeline; holds only object references and small records."""

    row: ManifestRow
    decoded: Any = None  # references to the decode stage's (record, slices, context)
    inferred: Any = None  # references to the inference call's (record, maps)
    actor: int = -1
    generation: int = 0  # of the actor at `actor` when the call was made
    attempts: int = 0


class Dispatcher:
    """Sends each volume decode -> inference -> write as one chain and records how it ended.

    The three calls are submitted together, each taking the previous one's results as object references,
    so Ray starts each stage as soon as its inputs exist without a round trip through the driver. The
    actors execute calls out of order, so a volume that is slow to decode does not hold up the volumes
    queued behind it. The driver waits only for the write stage, whose record carries any earlier
    stage's failure; when a stage's worker or actor died instead, the driver finds which one from the
    references it kept and retries the inference on a fresh actor or records the failure.
    """

    def __init__(self, options: ScreenOptions, bundle: Bundle, backend: str, layout: OutputLayout, actors: Actors,
                 counts: Counts, log: JsonLog, display: ProgressDisplay) -> None:
        self.options, self.bundle, self.backend, self.layout, self.actors = options, bundle, backend, layout, actors
        self.counts, self.log, self.display = counts, log, display
        self.decode_fn = ray.remote(decode_volume).options(num_returns=3, num_cpus=1, max_retries=TASK_RETRIES,
                                                            scheduling_strategy="SPREAD")
        self.write_fn = ray.remote(write_volume).options(num_cpus=1, max_retries=TASK_RETRIES)
        self.pending: dict[Any, Flight] = {}
        self.peak_in_flight = 0
        self.stages_s = 0.0  # summed over volumes: with the wall time, what scheduling and transfers cost

    def run(self, rows: Iterator[ManifestRow], limit: int) -> None:
        exhausted = False
        while True:
            while not exhausted and len(self.pending) < limit:
                row = next(rows, None)
                exhausted = row is None
                if row is not None:
                    self._submit(Flight(row))
            self.peak_in_flight = max(self.peak_in_flight, len(self.pending))
            if not self.pending:
                return
            raise_if_interrupted()  # stop now, not after the cohort, if an interrupt's exception was swallowed
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            for ref in ready:
                self._finished(ref, self.pending.pop(ref))
            self.display.refresh()

    def _submit(self, flight: Flight) -> None:
        """Chain the volume's stages (its decode only the first time: a retry reuses the decoded objects)."""
        if flight.decoded is None:
            flight.decoded = self.decode_fn.remote(flight.row, self.bundle.config.preprocess, self.options.max_voxels,
                                                   self.options.skull_strip)
        decoded, slices, context = flight.decoded
        actors = self.actors
        flight.actor = actors.least_loaded()
        actors.load[flight.actor] += 1
        flight.generation, flight.attempts = actors.generations[flight.actor], flight.attempts + 1
        flight.inferred = actors.handles[flight.actor].infer.options(num_returns=2).remote(slices)
        inferred, maps = flight.inferred
        job = WriteJob(row=flight.row, out=self.layout.root, outputs=frozenset(self.options.outputs),
                       calibration=self.bundle.require_calibration(), backend=self.backend,
                       bundle_hash=self.bundle.hash, bundle_key=self.bundle.content_key)
        self.pending[self.write_fn.remote(job, decoded, inferred, context, maps)] = flight

    def _finished(self, ref: Any, flight: Flight) -> None:
        self.actors.load[flight.actor] -= 1
        try:
            written: WriteResult = ray.get(ref)
        except Exception as exc:
            return self._crashed(flight, exc)
        self.stages_s += written.stages_s
        if written.qc_flags:  # screened anyway; the flags also go to the volume's `qc_flags` column
            self.log.event("warning", id=flight.row.id, qc_flags=list(written.qc_flags),
                           message="; ".join(FLAGS[f] for f in written.qc_flags))
        if written.failure is not None:
            return self._fail(flight, written.failure)
        self.counts.done += 1
        self.log.event("volume", id=flight.row.id, status="ok", lesion_count=written.lesion_count,
                       lesion_burden_ml=written.lesion_burden_ml, stages_s=round(written.stages_s, 4))
        return None

    def _crashed(self, flight: Flight, exc: BaseException) -> None:
        """A stage's process died for good (after Ray's retries): find which; a dead actor gets one more try."""
        stage, cause = "write", exc
        for name, record in (("decode", flight.decoded[0]), ("inference", flight.inferred[0])):
            try:
                ray.get(record, timeout=0)
            except Exception as error:  # this stage's own error, not the write stage's copy of it
                stage, cause = name, error
                break
        actors = self.actors
        if stage == "inference" and isinstance(cause, RayActorError):
            if actors.generations[flight.actor] == flight.generation:
                actors.replace(flight.actor, cause)
            if flight.attempts < INFERENCE_ATTEMPTS:
                return self._submit(flight)
        return self._fail(flight, Failure(stage, *describe_ray(cause)))

    def _fail(self, flight: Flight, failure: Failure) -> None:
        row = flight.row
        size, mtime = input_signature(row.image)
        record_failure(self.layout, row.id, {
            "id": row.id, "path": str(row.image), "stage": failure.stage, "error_type": failure.error_type,
            "message": failure.message, "retry_on_resume": failure.retry_on_resume, "input_size": size,
            "input_mtime_ns": mtime, "bundle_hash": self.bundle.hash, **manifest_columns(row.extra),
        })
        self.counts.failed += 1
        self.log.event("volume", id=row.id, status="failed", stage=failure.stage, error_type=failure.error_type,
                       message=failure.message)
