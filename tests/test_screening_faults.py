"""`phanes screen` under faults, on the session's Ray head node: a killed inference actor, a SIGKILLed driver
followed by a resume on a local instance started on demand that leaves no process behind, and SIGTERM.

Apart from test_screening.py so pytest-xdist can run these long cases beside the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from phanes_cli.screening.engine import EXIT_OK, screen
from tests._ray import HEAD_IP, RayCluster
from tests.test_screening import _options, assert_same_results, read_tables, series


def committed(out: Path) -> list[Path]:
    """The run's commit markers; a '.tmp-*.json' being staged (or left by a SIGKILL) is not a commit."""
    folder = out / "parts" / "done"
    return [p for p in folder.glob("*.json") if not p.name.startswith(".")] if folder.is_dir() else []


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle  # the session's (conftest): read only here


@pytest.fixture(scope="module")
def actor_killed_run(cluster: RayCluster, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Screen 8 volumes with one actor and SIGKILL that actor's process once the first volume is committed."""
    import ray

    root = tmp_path_factory.mktemp("series")
    series(root / "cohort", 8)
    out = root / "out_actor"
    seen: dict[str, object] = {}

    def killer() -> None:
        deadline = time.monotonic() + 900  # generous: a loaded 2-core machine starts Ray workers slowly
        while time.monotonic() < deadline:
            done = committed(out)
            names = [n for n in ray.util.list_named_actors() if n.startswith("phanes-infer-")]
            if done and names:
                pid = ray.get(ray.get_actor(names[0]).pid.remote(), timeout=60)
                os.kill(pid, signal.SIGKILL)
                seen.update(pid=pid, done_at_kill=len(done))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = screen([str(root / "cohort")], _options(bundle, out, num_actors=1))
    thread.join(timeout=5)
    return {"summary": summary, "out": out, "cohort": root / "cohort", **seen}


def test_killed_actor_is_restarted_and_its_volumes_retried(actor_killed_run: dict[str, object]) -> None:
    summary = actor_killed_run["summary"]
    assert "pid" in actor_killed_run, "the actor was never killed"
    assert 1 <= actor_killed_run["done_at_kill"] < 8  # type: ignore[operator]
    assert (summary.done, summary.failed, summary.exit_code) == (8, 0, EXIT_OK)  # type: ignore[attr-defined]
    volumes = read_tables(actor_killed_run["out"])["volumes"]  # type: ignore[arg-type]
    assert volumes["id"].tolist() == [f"s{i:02d}" for i in range(8)]
    assert (volumes["status"] == "ok").all()


DRIVER = """
import os, sys
from pathlib import Path
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
bundle, out, cohort, address, node_ip = sys.argv[1:6]
summary = screen([cohort], ScreenOptions(bundle=Path(bundle), out=Path(out),
                 address=None if address == "local" else address,
                 node_ip=node_ip, num_actors=1, quiet=True, object_store_mb=200))
stats = [open(f"/proc/{p}/stat").read() for p in os.listdir("/proc")
         if p.isdigit() and os.path.exists(f"/proc/{p}/stat")]
kids = [s for s in stats if s.rsplit(")", 1)[1].split()[1] == str(os.getpid())]
print("CHILDREN", len(kids), "DONE", summary.done, "FAILED", summary.failed, "SKIPPED", summary.skipped, flush=True)
sys.exit(summary.exit_code)
"""


@pytest.mark.slow
def test_killed_driver_then_resume_gives_identical_outputs(actor_killed_run: dict[str, object], cluster: RayCluster,
                                                           bundle: Path, tmp_path: Path) -> None:
    """SIGKILL the driver mid-run, resume with a fresh driver on a local instance: same outputs, no duplicates."""
    out = tmp_path / "out"
    cohort = str(actor_killed_run["cohort"])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(bundle), str(out), cohort,
                             cluster.address, HEAD_IP], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900  # generous: only bounds how long a broken run takes to fail
    while time.monotonic() < deadline and proc.poll() is None:
        if len(committed(out)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"driver ended before it could be killed: {proc.communicate()[0].decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    n_committed = len(committed(out))
    assert 2 <= n_committed < 8

    resumed = subprocess.run([sys.executable, "-c", DRIVER, str(bundle), str(out), cohort, "local", "127.0.0.4"],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == EXIT_OK, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("CHILDREN"))
    fields = dict(zip(line.split()[::2], map(int, line.split()[1::2]), strict=False))
    assert fields["CHILDREN"] == 0  # the local Ray instance was shut down with nothing left behind
    assert fields["SKIPPED"] >= n_committed
    assert fields["SKIPPED"] + fields["DONE"] == 8
    assert fields["FAILED"] == 0
    volumes = read_tables(out)["volumes"]
    assert volumes["id"].is_unique
    assert len(volumes) == 8
    assert not list(out.rglob(".tmp-*"))
    assert_same_results(out, actor_killed_run["out"])  # type: ignore[arg-type]


def test_sigterm_ends_a_screening_run_cleanly_with_exit_143(cluster: RayCluster, bundle: Path, tmp_path: Path) -> None:
    """SIGTERM mid-run (a scheduler's stop): exit 143, no native stack dump, run.json says 'interrupted', and
    the committed volumes stay committed."""
    series(tmp_path / "cohort", 8)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "phanes"), "screen", str(tmp_path / "cohort"),
                             "--bundle", str(bundle), "--out", str(out), "--address", cluster.address,
                             "--node-ip", HEAD_IP, "--actors", "1", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if committed(out):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr and "Stack trace" not in stderr
    assert any(line.startswith("terminated") for line in stderr.splitlines())
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["finished"]
    done = {p.stem for p in committed(out)}
    assert done and set(read_tables(out)["volumes"]["id"]) >= done
