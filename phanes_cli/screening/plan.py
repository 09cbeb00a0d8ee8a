"""What a run will do before it starts: which volumes (resume) and how many actors on which resources.

Resume: a volume is skipped when its done marker matches (see `outputs`). Failures are retried on the
next run, except errors of the input file itself (unreadable, not 3D, NaN voxels...) while that file is
unchanged and the bundle is the same; those stay failed and count as failed in the summary and exit
status. `overwrite` removes the previous outputs of the run's ids first and redoes everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import ray

from phanes_cli.errors import ConfigError
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.commit import is_done, previous_failure, read_marker
from phanes_cli.run_folder.layout import OutputLayout, check_stems
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
    """Inference actors: how many, CPUs and GPUs Ray reserves for each, the torch/ORT threads each runs, and how
    many volumes may be in flight at once."""

    count: int
    cpus: float
    gpus: float
    max_in_flight: int
    threads: int = 1


@dataclass(frozen=True)
class NodeShare:
    """One CPU node's inference actors: how many, their threads and the CPUs Ray reserves for each."""

    actors: int
    threads: int
    cpus: float


def io_cpus(node_cpus: int) -> int:
    """CPUs a node keeps for the decode and write tasks: a quarter, at least one (they are about a third of a
    volume's CPU time with the cpu model, less with bigger ones)."""
    return max(1, node_cpus // 4)


def cpu_share(node_cpus: int) -> NodeShare:
    """How a node's CPUs are split when the actors run on CPUs (the rule in docs/measurements.md: Screening throughput).

    Each core left after `io_cpus` gets an actor of one thread: the networks' batches of 128 px slices scale
    poorly across threads, and on 2 cores two 1-thread actors screened 7-20% more volumes per hour than one
    2-thread actor (1.6x one 1-thread actor). A node with fewer than two such cores gets one
    actor per core, sharing the Ray CPU left after the decode and write CPU (none on one core): the networks are
    most of the work, and the decode and write tasks sit idle most of the time on such a node.
    """
    inference = node_cpus - io_cpus(node_cpus)
    actors = max(1, node_cpus) if inference < 2 else inference
    return NodeShare(actors=actors, threads=1, cpus=max(0, inference) / actors)


SpeedAt = Callable[[int], float]  # slices/s of the backend the actors will run, at a thread count


def measured_share(node_cpus: int, speed_at: SpeedAt) -> NodeShare:
    """`cpu_share`, or the same cores as actors of two threads, whichever screens more slices per second by the
    measured speeds: actors x speed(threads). A backend whose sessions scale across threads (ONNX Runtime,
    OpenVINO) can be faster as one two-thread actor than as two one-thread actors; eager torch is not."""
    single = cpu_share(node_cpus)
    if node_cpus < 2:
        return single
    inference = node_cpus - io_cpus(node_cpus)
    pairs = max(1, inference // 2)
    paired = NodeShare(actors=pairs, threads=2, cpus=max(1.0, float(inference)) / pairs)
    return paired if paired.actors * speed_at(2) > single.actors * speed_at(1) else single


def node_cpu_counts() -> list[int]:
    """The CPUs of each alive Ray node that has any (a head started with --num-cpus=0 runs no actor)."""
    counts = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in counts if c > 0]


def cpu_plan(node_cpus: list[int]) -> NodeShare:
    """The CPU plan of a cluster: every node's share, with the threads and CPUs of its smallest node."""
    shares = [cpu_share(c) for c in node_cpus] or [cpu_share(1)]
    return NodeShare(actors=sum(s.actors for s in shares), threads=min(s.threads for s in shares),
                     cpus=min(s.cpus for s in shares))


def actors_that_fit(nodes: list[tuple[float, float]], cpus: float, gpus: float) -> float:
    """How many actors reserving `cpus` CPUs and `gpus` GPUs each the (CPUs, GPUs) nodes hold at once: an actor
    lives on one node, so a reservation larger than every node never starts (Ray would wait for it for ever)."""
    total = 0.0
    for node in nodes:
        fits = [math.floor(have / need + 1e-9) for have, need in zip(node, (cpus, gpus), strict=True) if need > 0]
        total += min(fits) if fits else math.inf
    return total


def _check_fits(count: int, per_cpu: float, per_gpu: float, cpus: float) -> None:
    """Refuse a plan Ray could not run: more actor processes than the cluster has CPUs (each loads the networks
    and needs a core to make progress: 50 on 2 cores screened nothing while their memory grew), or reservations
    that no node, or not all the nodes together, can hold."""
    if count > cpus:
        raise ConfigError(f"{count} inference actors need a CPU each to make progress; the cluster has {cpus:g}: "
                          f"lower --actors (at most {int(cpus)})")
    nodes = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive")]
    fit = actors_that_fit(nodes, per_cpu, per_gpu)
    if fit < count:
        largest = max(nodes, default=(0.0, 0.0))
        raise ConfigError(f"{count} actor(s) of {per_cpu:g} CPU and {per_gpu:g} GPU each: the nodes hold only "
                          f"{fit:g} at once (the largest has {largest[0]:g} CPUs and {largest[1]:g} GPUs); lower "
                          "--actors, --cpus-per-actor or --gpus-per-actor")


def plan_actors(options: ScreenOptions, speed_at: SpeedAt | None = None) -> ActorPlan:
    """Actor count and resources from the options and what the cluster has; refuse plans that cannot run.

    GPUs: one actor per GPU (`gpus_per_actor` shares), one CPU and one thread each. CPUs only: `cpu_plan`
    of the nodes' CPU counts; on a single node with `speed_at` (the backend measured on this machine) and no
    actor option given, `measured_share` picks one- or two-thread actors. Options given override the planned
    value they name; `--cpus-per-actor` alone also sets the threads (as many as the CPUs), and more actors than
    planned get fewer CPUs each, up to one actor per CPU of the cluster (`_check_fits`).
    """
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    per_gpu = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    nodes = node_cpu_counts()
    free = options.num_actors is None and options.cpus_per_actor is None and options.threads_per_actor is None
    if per_gpu > 0:
        share = NodeShare(actors=max(1, int(gpus // per_gpu)), threads=1, cpus=1.0)
    elif speed_at is not None and free and len(nodes) == 1:
        share = measured_share(nodes[0], speed_at)
    else:
        share = cpu_plan(nodes)
    count = options.num_actors if options.num_actors is not None else share.actors
    if options.cpus_per_actor is not None:
        per_cpu, threads = options.cpus_per_actor, max(1, int(options.cpus_per_actor))
    else:  # more actors than planned share the CPUs that leave one for decoding and writing
        per_cpu, threads = min(share.cpus, max(0.0, (cpus - 1) / count)), share.threads
    threads = options.threads_per_actor or threads
    if per_gpu * count > gpus + 1e-9:
        raise ConfigError(f"{count} actor(s) x {per_gpu} GPU need {per_gpu * count:g} GPUs; the cluster has {gpus:g}")
    _check_fits(count, per_cpu, per_gpu, cpus)
    if cpus - count * per_cpu < 1:
        raise ConfigError(f"{count} actor(s) x {per_cpu:g} CPU leave no CPU for decoding and writing "
                          f"(the cluster has {cpus:g}); lower --actors or --cpus-per-actor")
    return ActorPlan(count=count, cpus=per_cpu, gpus=per_gpu, max_in_flight=options.max_in_flight or max(4, 4 * count),
                     threads=threads)
