"""What a run will do before it starts: which volumes (resume) and how many actors on which resources.

Resume: a volume is skipped when its done marker matches (see `outputs`). Failures are retried on the
next run, except errors of the input file itself (unreadable, not 3D, NaN voxels...) while that file is
unchanged and the bundle is the same; those stay failed and count as failed in the summary and exit
status. `overwrite` removes the previous outputs of the run's ids first and redoes everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from phanes_cli.errors import ConfigError
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.screening.commit import is_done, previous_failure, read_marker
from phanes_cli.screening.layout import OutputLayout, check_stems
from phanes_cli.screening.options import ScreenOptions


@dataclass(frozen=True)
class VolumePlan:
    """The volumes to run, how many were done before and how many input failures stand."""

    todo: list[ManifestRow]
    skipped: int
    standing: int


def plan_volumes(rows: list[ManifestRow], layout: OutputLayout, options: ScreenOptions, bundle_key: str,
                 bundle_hash: str) -> VolumePlan:
    """Split the cohort by what OUT already holds (see the module docstring); `overwrite` clears it first.

    Ids that would share a file name, in this cohort or with another id OUT already holds, are refused
    before anything is written (`read_marker`).
    """
    check_stems([row.id for row in rows], "the input ids")
    for row in rows:
        read_marker(layout, row.id)
    if options.overwrite:
        for row in rows:
            layout.clear(row.id)
        return VolumePlan(rows, 0, 0)
    if not options.resume:
        return VolumePlan(rows, 0, 0)
    todo, done, standing = [], 0, 0
    for row in rows:
        if is_done(layout, row.id, row.image, bundle_key, options.outputs, options.min_lesion_ml or 0.0):
            done += 1
        elif previous_failure(layout, row.id, row.image, bundle_hash) is not None:
            standing += 1
        else:
            todo.append(row)
    return VolumePlan(todo, done, standing)


@dataclass(frozen=True)
class ActorPlan:
    """Inference actors: how many, CPUs and GPUs each, and how many volumes may be in flight at once."""

    count: int
    cpus: float
    gpus: float
    max_in_flight: int


def plan_actors(options: ScreenOptions) -> ActorPlan:
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
    return ActorPlan(count=count, cpus=options.cpus_per_actor, gpus=per_gpu,
                     max_in_flight=options.max_in_flight or max(4, 4 * count))
