"""A real two-node Ray cluster on this machine (`ray start --head` + a second `ray start --address` node with
its own resources); `phanes screen --address` spreads one cohort over both nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from phanes_cli.screening.engine import EXIT_OK, screen
from phanes_cli.screening.options import ScreenOptions
from tests._ray import HEAD_IP, RayCluster
from tests.test_screening import read_tables, series

SECOND_IP = "127.0.0.3"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[RayCluster]:
    import ray

    assert not ray.is_initialized()
    cluster = RayCluster()
    try:
        cluster.start_head(cpus=2)
        cluster.add_node(SECOND_IP, cpus=2, resources='{"node2": 1}')
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_env")  # the driver must agree with the nodes on authentication
def test_cohort_is_screened_across_two_nodes(two_nodes: RayCluster, tiny_bundle: Path, tmp_path: Path) -> None:
    import ray

    bundle = tiny_bundle
    series(tmp_path / "cohort", 6)
    out = tmp_path / "out"
    summary = screen([str(tmp_path / "cohort")], ScreenOptions(bundle=bundle, out=out, address=two_nodes.address,
                                                               node_ip=HEAD_IP, num_actors=2, quiet=True))
    assert not ray.is_initialized()  # the driver disconnected; the cluster itself keeps running
    assert (summary.done, summary.failed, summary.exit_code) == (6, 0, EXIT_OK)
    volumes = read_tables(out)["volumes"]
    assert volumes["id"].tolist() == [f"s{i:02d}" for i in range(6)]
    assert set(volumes["decode_node"]) == {HEAD_IP, SECOND_IP}  # CPU tasks ran on both nodes
    assert set(volumes["inference_node"]) == {HEAD_IP, SECOND_IP}  # one actor per node
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["ray"]["nodes"] == 2
    assert manifest["ray"]["actors"] == 2
