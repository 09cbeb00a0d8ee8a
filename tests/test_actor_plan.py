"""The inference-actor plan (`screening.plan`): actors, threads and reserved CPUs from the CPUs per node.

The rule (docs/measurements.md: Screening throughput): a quarter of a node's cores (at least one) stays with the
decode and write tasks, each other core gets an actor of one thread; a node with fewer than two such cores gets
one actor per core, sharing the Ray CPU left to them. The cluster's resources are what `ray.nodes()` /
`ray.cluster_resources()` report, given here as the plan's inputs; `local_cpus` is checked under a real `taskset`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phanes_cli.errors import ConfigError
from phanes_cli.screening import plan
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.plan import ActorPlan, NodeShare, cpu_plan, cpu_share, plan_actors


@pytest.mark.parametrize(("cores", "share"), [
    (1, NodeShare(actors=1, threads=1, cpus=0.0)),  # the one core is shared; Ray keeps its CPU for the tasks
    (2, NodeShare(actors=2, threads=1, cpus=0.5)),  # an actor on each core, one Ray CPU left for the tasks
    (3, NodeShare(actors=2, threads=1, cpus=1.0)),
    (4, NodeShare(actors=3, threads=1, cpus=1.0)),
    (8, NodeShare(actors=6, threads=1, cpus=1.0)),
    (16, NodeShare(actors=12, threads=1, cpus=1.0)),  # 12 cores for 12 actors, 4 for decoding and writing
    (64, NodeShare(actors=48, threads=1, cpus=1.0)),
])
def test_the_cpu_share_of_one_node(cores: int, share: NodeShare) -> None:
    assert cpu_share(cores) == share
    # never more threads than cores, and Ray always keeps at least one CPU for the decode and write tasks
    assert share.actors * share.threads <= cores
    assert cores - share.actors * share.cpus >= 1


def test_a_cluster_plans_every_node_with_the_smallest_nodes_threads() -> None:
    assert cpu_plan([16, 16]) == NodeShare(actors=24, threads=1, cpus=1.0)
    assert cpu_plan([16, 2]) == NodeShare(actors=14, threads=1, cpus=0.5)
    assert cpu_plan([]) == cpu_share(1)


def _cluster(monkeypatch: pytest.MonkeyPatch, cores: list[int], gpus: int = 0) -> None:
    """What Ray would report for nodes of these CPU counts (a head with 0 CPUs is listed and ignored)."""
    nodes: list[dict[str, Any]] = [{"Alive": True, "Resources": {"CPU": float(c)}} for c in cores]
    if gpus:
        nodes[0]["Resources"]["GPU"] = float(gpus)
    nodes += [{"Alive": True, "Resources": {}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(plan.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(plan.ray, "cluster_resources", lambda: {"CPU": float(sum(cores)), "GPU": float(gpus)})


def _options(**kw: Any) -> ScreenOptions:
    return ScreenOptions(bundle=Path("b"), out=Path("o"), **kw)


def test_plan_on_2_and_16_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _cluster(monkeypatch, [2])
    assert plan_actors(_options()) == ActorPlan(count=2, cpus=0.5, gpus=0.0, max_in_flight=8, threads=1)
    _cluster(monkeypatch, [16])
    assert plan_actors(_options()) == ActorPlan(count=12, cpus=1.0, gpus=0.0, max_in_flight=48, threads=1)


@pytest.mark.parametrize(("cores", "speeds", "share"), [
    # two one-thread actors (20 slices/s together) against one two-thread actor
    (2, {1: 10.0, 2: 15.0}, NodeShare(actors=2, threads=1, cpus=0.5)),  # eager torch: threads scale poorly
    (2, {1: 10.0, 2: 25.0}, NodeShare(actors=1, threads=2, cpus=1.0)),  # a runtime whose sessions scale
    (2, {1: 10.0, 2: 20.0}, NodeShare(actors=2, threads=1, cpus=0.5)),  # a tie keeps the one-thread rule
    (16, {1: 10.0, 2: 21.0}, NodeShare(actors=6, threads=2, cpus=2.0)),  # 12 cores: 6 x 21 > 12 x 10
    (16, {1: 10.0, 2: 19.0}, NodeShare(actors=12, threads=1, cpus=1.0)),
    (1, {1: 10.0, 2: 99.0}, NodeShare(actors=1, threads=1, cpus=0.0)),  # one core: nothing to weigh
])
def test_measured_speeds_choose_one_or_two_thread_actors(cores: int, speeds: dict[int, float],
                                                         share: NodeShare) -> None:
    assert plan.measured_share(cores, speeds.__getitem__) == share
    assert share.actors * share.threads <= cores


def test_measured_speeds_plan_a_single_node_unless_an_actor_option_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def speed(threads: int) -> float:
        asked.append(threads)
        return {1: 10.0, 2: 25.0}[threads]

    _cluster(monkeypatch, [2])
    assert plan_actors(_options(), speed) == ActorPlan(count=1, cpus=1.0, gpus=0.0, max_in_flight=4, threads=2)
    assert sorted(set(asked)) == [1, 2]
    asked.clear()
    for given in ({"num_actors": 2}, {"threads_per_actor": 1}, {"cpus_per_actor": 0.5}):
        assert plan_actors(_options(**given), speed).threads == 1
    _cluster(monkeypatch, [2, 2])  # two nodes: the driver's CPU is not theirs, the fixed rule plans them
    assert plan_actors(_options(), speed).threads == 1
    _cluster(monkeypatch, [16], gpus=2)  # GPUs: the CPU speeds do not matter
    assert plan_actors(_options(), speed).gpus == 1.0
    assert asked == []


def test_options_override_the_planned_values(monkeypatch: pytest.MonkeyPatch) -> None:
    _cluster(monkeypatch, [16])
    assert plan_actors(_options(threads_per_actor=4)).threads == 4
    # more actors than planned share the CPUs that leave one for the tasks; their threads stay as planned
    assert plan_actors(_options(num_actors=16)) == ActorPlan(count=16, cpus=0.9375, gpus=0.0, max_in_flight=64,
                                                             threads=1)
    # --cpus-per-actor alone: as many threads as CPUs (the behaviour before the plan)
    assert plan_actors(_options(num_actors=3, cpus_per_actor=4.0)).threads == 4
    with pytest.raises(ConfigError, match="leave no CPU for decoding and writing"):
        plan_actors(_options(num_actors=4, cpus_per_actor=4.0))
    _cluster(monkeypatch, [16], gpus=2)  # GPUs: one actor per GPU, one CPU and one thread each
    assert plan_actors(_options()) == ActorPlan(count=2, cpus=1.0, gpus=1.0, max_in_flight=8, threads=1)


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset and CPU affinity (Linux)")
def test_local_cpus_follows_the_process_affinity() -> None:
    code = "from phanes_cli.screening.session import local_cpus; print(local_cpus())"
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert one.stdout.strip() == "1"


def test_more_actors_than_cpus_or_reservations_no_node_holds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each actor process loads the networks and needs a core: 50 on 2 cores screened nothing while memory grew.
    An actor lives on one node: a reservation larger than every node (or than the nodes hold together) would
    wait for ever."""
    _cluster(monkeypatch, [2])
    with pytest.raises(ConfigError, match=r"^50 inference actors need a CPU each to make progress; the cluster has 2: "
                                          r"lower --actors \(at most 2\)$"):
        plan_actors(_options(num_actors=50))
    _cluster(monkeypatch, [2, 2])
    with pytest.raises(ConfigError, match=r"the nodes hold only 0 at once \(the largest has 2 CPUs and 0 GPUs\)"):
        plan_actors(_options(num_actors=1, cpus_per_actor=3.0))
    with pytest.raises(ConfigError, match="the nodes hold only 2 at once"):  # 4 CPUs in all, 1.5 + 1.5 per node: 2
        plan_actors(_options(num_actors=3, cpus_per_actor=1.5))
    _cluster(monkeypatch, [8, 8], gpus=2)  # both GPUs on the first node
    assert plan_actors(_options(gpus_per_actor=1.0)).count == 2
    with pytest.raises(ConfigError, match="the nodes hold only 1 at once"):
        plan_actors(_options(num_actors=2, gpus_per_actor=1.0, cpus_per_actor=5.0))


@pytest.mark.parametrize(("nodes", "cpus", "gpus", "fit"), [
    ([(2.0, 0.0)], 0.5, 0.0, 4), ([(2.0, 0.0), (3.0, 0.0)], 1.5, 0.0, 3), ([(16.0, 2.0), (16.0, 0.0)], 1.0, 1.0, 2),
    ([(16.0, 1.0)], 1.0, 0.5, 2), ([(1.0, 0.0)], 0.0, 0.0, math.inf),
])
def test_actors_that_fit_count_per_node(nodes: list[tuple[float, float]], cpus: float, gpus: float,
                                        fit: float) -> None:
    assert plan.actors_that_fit(nodes, cpus, gpus) == fit


def test_screen_with_more_actors_than_cpus_is_refused_on_a_real_cluster(ray_head: Any, tmp_path: Path) -> None:
    """`phanes screen --actors 50` on a real Ray node of 2 CPUs (loopback): one line and exit 2 at once. Accepted
    before at 0.02 CPU per actor, it screened nothing while 50 actor processes loaded the networks."""
    from tests._ray import HEAD_IP
    from tests.test_screening import affines, make_bundle, write_head

    bundle = make_bundle(tmp_path / "bundle")
    scan = write_head(tmp_path / "scans" / "s.nii.gz", affines()["ras"], seed=1)
    out = tmp_path / "out"
    run = subprocess.run([str(Path(sys.executable).parent / "phanes"), "screen", str(scan), "--bundle", str(bundle),
                          "--out", str(out), "--quiet", "--address", ray_head.address, "--node-ip", HEAD_IP,
                          "--actors", "50"], capture_output=True, text=True, timeout=240,
                         env={**ray_head.env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    last = [line for line in run.stderr.splitlines() if line.strip()][-1]
    assert last == ("error: 50 inference actors need a CPU each to make progress; the cluster has 2: lower --actors "
                    "(at most 2)"), run.stderr
    assert not (out / "maps").exists() or not any((out / "maps").iterdir())
