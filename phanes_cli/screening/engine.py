"""`phanes screen` as one function: plan the run, stream the cohort through Ray, consolidate, report.

The parts: `options` (the flags), `session` (the lock on OUT and the Ray session), `plan` (resume: which
volumes; which actors), `dispatch` (the streaming loop and its fault handling), `outputs` (layout and
commit protocol), `report` (progress, JSON-lines log, run manifest). Whatever happens, the part files
are consolidated into the tables and the manifest records how the run ended: "finished", "interrupted"
(Ctrl-C, SIGTERM) or "crashed" (with the error). A manifest still saying "running" when the next run takes
the lock belongs to a process that is gone (the OS dropped its lock): it is marked "abandoned".
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.errors import raise_if_interrupted, stop_on_sigterm
from phanes_cli.infra.folders import claim_folder
from phanes_cli.inputs.bids import is_bids_root
from phanes_cli.inputs.discovery import DICOM_FOLDER, Rejected, resolve_with_unused
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.commit import record_failure
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import manifest_columns
from phanes_cli.screening.bids_derivative import start_layout, write_burden_tables
from phanes_cli.screening.dispatch import Actors, Dispatcher
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.plan import plan_actors, plan_volumes
from phanes_cli.screening.run_log import Counts, JsonLog, ProgressDisplay, now_iso, print_summary, write_run_manifest
from phanes_cli.screening.session import ray_session, run_lock
from phanes_cli.screening.tasks import backend_speed

EXIT_OK = 0
EXIT_SOME_FAILED = 3


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


def screen(inputs: list[str], options: ScreenOptions) -> ScreenSummary:
    """Screen every volume named by INPUTS into `options.out`; resumable, one failure row per bad volume."""
    started, started_iso = time.monotonic(), now_iso()
    stop_on_sigterm(fresh=True)  # this run's interrupts only (the Python API may call it again after one)
    options.validate()
    backend = options.backend  # checked by options.validate()
    bundle, options = _with_overrides(load_bundle(options.bundle), options)
    layout = OutputLayout(Path(options.out))  # OUT is claimed first: inputs inside it are never taken
    claim_folder(layout.root, (layout.lock.name, layout.run_manifest.name), "a `phanes screen` run")
    log = JsonLog(options.log_jsonl)
    with run_lock(layout):  # DICOM folders are converted into OUT/dicom: under the lock
        rows, listed = resolve_with_unused(inputs, exclude=options.exclude or layout.root, bids=options.bids,
                                           dicom_cache=layout.root / DICOM_FOLDER)
        series = [item for item in listed if not item.unused and item.id is not None]
        previous = mark_abandoned(layout)
        start_layout(layout, options.layout, [r.id for r in rows], [Path(a) for a in inputs if is_bids_root(a)])
        layout.ensure()
        layout.remove_temporaries()
        plan = plan_volumes(rows, layout, options, bundle.content_key, bundle.hash)
        _record_series(layout, series, bundle.hash, log)
        counts = Counts(total=len(rows) + len(series), failed=plan.standing + len(series), skipped=plan.skipped)
        manifest: dict[str, Any] = {
            "run_id": uuid.uuid4().hex[:12], "status": "running", "started": started_iso, "finished": None,
            "pid": os.getpid(), "host": socket.gethostname(), "previous_run": previous,
            "inputs": list(inputs), "bundle": {"path": str(bundle.path), "hash": bundle.hash,
                                               "content_key": bundle.content_key,
                                               "calibration": bundle.require_calibration().to_dict()},
            "options": options.to_json(), "backend": backend, "counts": {}, "ray": {},
        }
        write_run_manifest(layout.run_manifest, manifest)
        display = ProgressDisplay(counts, options.quiet)
        status = "crashed"
        try:
            log.event("start", total=len(rows), todo=len(plan.todo), skipped=plan.skipped,
                      standing_failures=plan.standing, out=str(layout.root), bundle_hash=bundle.hash)
            if plan.todo:
                _dispatch(plan.todo, options, bundle, backend, layout, counts, log, display, manifest)
            raise_if_interrupted()  # an interrupt whose exception was swallowed on the way still counts
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as exc:
            manifest["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise
        finally:
            tables = consolidate(layout, rows)  # covariates joined from the inputs as they are now
            write_burden_tables(layout)
            if tables["damaged"]:  # failure rows now; the exit status counts them
                counts.failed += tables["damaged"]
                log.event("warning", message=f"{tables['damaged']} committed volume(s) had unreadable part files: "
                          "failure rows now, screened again by the next run")
            seconds = time.monotonic() - started
            manifest.update(status=status, finished=now_iso(), seconds=seconds, tables=tables,
                            counts={"total": counts.total, "done": counts.done, "failed": counts.failed,
                                    "skipped": counts.skipped})
            write_run_manifest(layout.run_manifest, manifest)
            try:
                log.event("end", status=status, total=counts.total, done=counts.done, failed=counts.failed,
                          skipped=counts.skipped, seconds=seconds)
            finally:
                log.close()
    if not options.quiet:
        ids = [row.id for row in rows] + [str(item.id) for item in series]
        print_summary(display.console, counts, seconds, layout.root, _failures_of(layout, ids))
    return ScreenSummary(total=counts.total, done=counts.done, failed=counts.failed, skipped=counts.skipped,
                         out=layout.root, seconds=seconds)


def _with_overrides(bundle: Bundle, options: ScreenOptions) -> tuple[Bundle, ScreenOptions]:
    """The bundle with `--min-lesion-ml` applied to its calibration, and the options recording the size used."""
    calibration = bundle.require_calibration().with_lesion_rule(min_lesion_ml=options.min_lesion_ml)
    return replace(bundle, calibration=calibration), replace(options, min_lesion_ml=calibration.min_lesion_ml)


def mark_abandoned(layout: OutputLayout) -> dict[str, Any] | None:
    """Mark a run.json left "running" as "abandoned" (call holding the lock: its process is gone).

    Returns the previous run's id, status, pid, host and start time, or None when there is no run.json.
    """
    try:
        old = json.loads(layout.run_manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("status") == "running":
        old.update(status="abandoned", abandoned=now_iso())
        write_run_manifest(layout.run_manifest, old)
    return {k: old.get(k) for k in ("run_id", "status", "pid", "host", "started", "finished")}


def _dispatch(todo: list[ManifestRow], options: ScreenOptions, bundle: Bundle, backend: str, layout: OutputLayout,
              counts: Counts, log: JsonLog, display: ProgressDisplay, manifest: dict[str, Any]) -> None:
    """Inside a Ray session: plan and start the actors, stream `todo` through them, stop them.

    The manifest's `ray` section records the plan, the peak number of volumes in flight, the actors
    replaced, the seconds spent starting the actors (`startup_s`) and streaming (`stream_s`), and the
    seconds the volumes spent inside the stages (`stages_s`, summed over volumes), and where each inference
    actor's time went (`actor_profiles`: networks, pre/post-processing, idle waiting for slices, its threads).
    """
    with ray_session(options), display:
        began = time.monotonic()
        local = options.address is None  # a local instance: one node, the driver's (used on CPU plans only)
        plan = plan_actors(options, _speed_on_node(bundle, backend, options, display) if local else None)
        manifest["ray"] = {"address": options.address, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                           "actors": plan.count, "cpus_per_actor": plan.cpus, "gpus_per_actor": plan.gpus,
                           "threads_per_actor": plan.threads, "max_in_flight": plan.max_in_flight}
        actors = Actors(options, bundle, backend, plan, manifest["run_id"], log)
        dispatcher = Dispatcher(options, bundle, backend, layout, actors, counts, log, display)
        try:
            reports = actors.wait_ready()
            manifest["backend_choice"] = reports  # every candidate skipped, with why: the run record
            for line in dict.fromkeys(report["why"] for report in reports):
                display.note(line)  # what runs the networks and why, in one line
            for reason in dict.fromkeys(r for report in reports for r in report["fallbacks"]):
                log.event("warning", message=reason)  # a refused artefact: say so, never silently
                display.warn(reason)
            ready = time.monotonic()
            dispatcher.run(iter(todo), plan.max_in_flight)
            manifest["ray"].update(startup_s=ready - began, stream_s=time.monotonic() - ready)
        finally:
            manifest["ray"]["actor_profiles"] = actors.profiles()
            actors.stop()
            manifest["ray"].update(peak_in_flight=dispatcher.peak_in_flight, actors_replaced=actors.replacements,
                                   stages_s=dispatcher.stages_s)


def _speed_on_node(bundle: Bundle, backend: str, options: ScreenOptions, display: ProgressDisplay
                   ) -> Callable[[int], float]:
    """The backend's slices/s at a thread count on the node, measured (once per model and CPU, then cached) by a
    Ray task: what `plan_actors` weighs one- against two-thread actors by."""
    task = ray.remote(backend_speed).options(num_cpus=1)

    def speed(threads: int) -> float:
        value, timed = ray.get(task.remote(str(bundle.path.absolute()), backend, threads, options.lpips_weights))
        if timed:
            display.note(f"timed backend {backend} at {threads} thread(s) on this CPU (once per model and CPU)")
        return float(value)
    return speed


def _record_series(layout: OutputLayout, series: list[Rejected], bundle_hash: str, log: JsonLog) -> None:
    """A failure row (stage `input`) for each DICOM series that is not a usable T1, with its metadata columns."""
    for item in series:
        vid = str(item.id)
        record_failure(layout, vid, {
            "id": vid, "path": item.path, "stage": "input", "error_type": "InputError", "message": item.reason,
            "retry_on_resume": False, "bundle_hash": bundle_hash, **manifest_columns(item.extra)})
        log.event("volume", id=vid, status="failed", stage="input", error_type="InputError", message=item.reason)


def _failures_of(layout: OutputLayout, ids: list[str]) -> list[dict[str, Any]]:
    """This run's rows of failures.parquet (the folder may hold other ids from earlier runs)."""
    path = layout.table("failures")
    wanted = set(ids)
    return [r for r in pq.read_table(path).to_pylist() if r["id"] in wanted] if path.is_file() else []
