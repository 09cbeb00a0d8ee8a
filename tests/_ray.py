"""A real Ray cluster of `ray start` nodes on loopback addresses, and how to find (and stop) exactly its processes.

Shared by the Ray tests: the session's one head node (conftest.ray_head) and the clusters of their own that the
two-node and SLURM tests start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY_BIN = Path(sys.executable).parent / "ray"
HEAD_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HEAD_IP, 0))
        return int(sock.getsockname()[1])


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of(temp_dir: str) -> list[int]:
    """Pids of the Ray processes whose command line names `temp_dir`, plus all their descendants."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    children: dict[int, list[int]] = {}
    for pid in pids:
        children.setdefault(_ppid(pid) or 0, []).append(pid)
    roots = [pid for pid in pids if pid != os.getpid() and temp_dir in _cmdline(pid)]
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return sorted(found)


class RayCluster:
    """A real Ray cluster of `ray start` nodes on loopback addresses; stop() kills exactly its processes."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="phr", dir="/tmp")  # short: Ray's socket paths must fit
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    def _ray(self, *args: str) -> None:
        subprocess.run([str(RAY_BIN), "start", *args, f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def start_head(self, cpus: int = 2) -> None:
        self._ray("--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}", f"--num-cpus={cpus}",
                  "--num-gpus=0", "--include-dashboard=false", "--object-store-memory=300000000",
                  *self._agent_ports())

    def add_node(self, ip: str, cpus: int, resources: str) -> None:
        self._ray(f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={cpus}", "--num-gpus=0",
                  f"--resources={resources}", "--object-store-memory=200000000", *self._agent_ports())

    @staticmethod
    def _agent_ports() -> list[str]:
        """Free ports instead of Ray's fixed defaults, so that this node can run beside another cluster's."""
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in processes_of(self.temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1.0)
        left = [p for p in processes_of(self.temp_dir) if Path(f"/proc/{p}/stat").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not left, f"Ray processes left running: {left}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)
