"""The SLURM recipe of docs/cluster.md, run for real: docs/slurm/phanes_screen.sbatch builds a two-node Ray
cluster on loopback addresses (head 127.0.0.2, worker 127.0.0.3) and screens a cohort through it.

Only SLURM itself is faked: the job's environment variables, and `scontrol` / `srun` shims on PATH that
expand the node list and run each step on this machine (`hostname --ip-address` answers the node's name,
which here is its address). Every `ray start`, the wait for the nodes, `phanes screen --address` and the
shutdown at exit are the script's own commands.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.main import get_command

from phanes_cli.cli import app
from tests._ray import HEAD_IP, free_port, processes_of
from tests.test_screening import make_bundle, series
from tests.test_screening_cluster import SECOND_IP

DOCS = Path(__file__).resolve().parents[1] / "docs"
SBATCH = DOCS / "slurm" / "phanes_screen.sbatch"
RAYJOB = DOCS / "kuberay" / "phanes-rayjob.yaml"

SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST: one name per line (the test's list is already expanded, comma-separated)
[ "$1" = show ] && [ "$2" = hostnames ] && echo "$3" | tr ',' '\\n'
"""
SRUN = """#!/bin/bash
# srun [--nodes=N] [--ntasks=N] -w NODE CMD...: run CMD here, as if on NODE
node=
while [ "$#" -gt 0 ]; do
    case "$1" in
        -w) node=$2; shift 2 ;;
        --nodelist=*) node=${1#*=}; shift ;;
        --*) shift ;;
        *) break ;;
    esac
done
if [ "$1" = hostname ]; then echo "$node"; exit 0; fi
exec "$@"
"""


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}/stat").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def _kill(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _alive(processes_of(temp_dir))
        for pid in left:
            os.kill(pid, sig)
        if left:
            time.sleep(1.0)


def _left_after(temp_dir: str, seconds: float) -> list[int]:
    """The cluster's processes still alive once `seconds` have passed, or none as soon as they are all gone."""
    deadline = time.monotonic() + seconds
    while (left := _alive(processes_of(temp_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_the_slurm_script_screens_on_two_ray_nodes(tmp_path: Path) -> None:
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    bundle = make_bundle(tmp_path / "bundle")
    series(tmp_path / "cohort", 3)
    out = tmp_path / "out"
    temp_dir = tempfile.mkdtemp(prefix="phs", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": f"{HEAD_IP},{SECOND_IP}", "SLURM_CPUS_PER_TASK": "2", "SLURM_GPUS_PER_TASK": "0",
           "RAY_PORT": str(free_port()), "RAY_START_ARGS": f"--temp-dir={temp_dir} --object-store-memory=200000000",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(["bash", str(SBATCH), str(bundle), str(out), str(tmp_path / "cohort"), "--",
                                 "--actors", "2", "--batch-size", "8"],
                                env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 Ray nodes up" in result.stdout
        assert _left_after(temp_dir, 10.0) == []  # the script's exit trap stopped both Ray nodes
    finally:
        _kill(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["ray"]["nodes"] == 2 and manifest["ray"]["actors"] == 2
    volumes = pq.read_table(out / "volumes.parquet").to_pylist()
    assert [v["id"] for v in volumes] == ["s00", "s01", "s02"]
    assert all(v["status"] == "ok" and v["brain_mask_source"] == "threshold" for v in volumes)
    assert {v["decode_node"] for v in volumes} <= {HEAD_IP, SECOND_IP}


def test_the_rayjob_entrypoint_is_a_valid_screen_command() -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["phanes", "screen"]
    screen = get_command(app).commands["screen"]  # type: ignore[attr-defined]
    with screen.make_context("screen", args[2:]) as ctx:  # parses every option: unknown or bad ones raise
        params = ctx.params
    assert params["address"] == "auto" and params["device"] == "cuda" and params["skull_strip"] == "auto"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert gpus >= 1  # --device cuda: the actors need GPUs, which only the workers have
