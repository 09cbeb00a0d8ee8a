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
from tests.test_screening import series
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
def test_the_slurm_script_screens_on_two_ray_nodes(tiny_bundle: Path, tmp_path: Path) -> None:
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    bundle = tiny_bundle
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


def _gpu_count(env: dict[str, str]) -> str:
    """The SLURM script's own gpu_count function, run under `env` (only SLURM/CUDA variables set)."""
    text = SBATCH.read_text()
    function = text[text.index("gpu_count() {"):text.index("\ngpus=$(gpu_count)")]
    run = subprocess.run(["bash", "-c", f"{function}\ngpu_count"], env={"PATH": os.environ["PATH"], **env},
                         capture_output=True, text=True, timeout=30, check=True)
    return run.stdout.strip()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "0"),
    ({"SLURM_GPUS_PER_TASK": "2"}, "2"),
    ({"SLURM_GPUS_PER_TASK": "a100:4"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),  # --gres=gpu:4
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),  # --gres on an older SLURM: only the visible devices
    ({"SLURM_STEP_GPUS": "2,3"}, "2"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "0"),
    ({"SLURM_GPUS_ON_NODE": "8", "PHANES_NUM_GPUS": "1"}, "1"),
], ids=["none", "per-task", "per-task-typed", "gres", "visible", "step-gpus", "no-devices", "override"])
def test_the_slurm_script_counts_gpus_however_they_were_requested(env: dict[str, str], expected: str) -> None:
    assert _gpu_count(env) == expected


def _pods(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_the_rayjob_gives_every_pod_shared_memory_an_object_store_and_gpus_to_match() -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    for group in _pods(job):
        pod = group["template"]["spec"]
        shm = {v["name"]: v for v in pod["volumes"]}["shm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts and "/data" in mounts
        store = int(group["rayStartParams"]["object-store-memory"])
        limit = shm["emptyDir"]["sizeLimit"]
        assert limit.endswith("Gi") and store < int(limit[:-2]) * 2**30  # the store fits in its /dev/shm
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"]
        assert int(limits["nvidia.com/gpu"]) > 1  # several GPUs per node: one actor each
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) == {"env_vars"} and all(isinstance(v, str) for v in env["env_vars"].values())
    assert "ray[default]" in RAYJOB.read_text()  # the job server KubeRay submits to needs it in the image


def test_the_ray_job_submit_example_is_a_valid_screen_command() -> None:
    text = (DOCS / "kuberay" / "submit.sh").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ray job submit"))
    args = shlex.split(line)
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert runtime_env["pip"] == ["phanes[onnx]==0.1.0"] and runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"
    command = args[args.index("--") + 1:]
    assert command[:2] == ["phanes", "screen"]
    screen = get_command(app).commands["screen"]  # type: ignore[attr-defined]
    with screen.make_context("screen", command[2:]) as ctx:
        assert ctx.params["address"] == "auto" and ctx.params["gpus_per_actor"] == 0.5 and ctx.params["bundle"] is None
