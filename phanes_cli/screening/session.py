"""What a run holds while it works: the lock on OUT and the Ray session.

Ray: `address=None` starts a private local instance and shuts it down at the end (no process is left);
`"auto"`, `"host:port"` or `"ray://host:port"` joins a running cluster and only disconnects. A local instance
offers the CPUs this process may use (`local_cpus`), on which `plan.cpu_plan` sizes the actors. If the
calling process already has Ray initialised, that session is used as it is. On a multi-node cluster the
inputs and OUT must be on a file system every node sees at the same paths. `node_ip` sets the address
this driver (and a local instance) registers under; None lets Ray choose, which suits a laptop; tests on
a machine without usable networking pass a loopback address such as 127.0.0.2. Joining a cluster that does
not answer would retry forever (Ray's driver waits for its GCS with no limit), so the join runs in a helper
thread and gives up after `connect_timeout` seconds with an error naming the address.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import ray

from phanes_cli.errors import PhanesError, stop_on_sigterm
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.screening.options import ScreenOptions

LOCK_ATTEMPTS = 20  # a lock file removed under us this many times in a row means something else is wrong


def _take_lock(path: Path) -> IO[str]:
    """Open and flock `path`, making sure the file locked is the one at `path` now.

    A run removes its lock file when it ends (so a finished OUT holds only its results); a run that
    opened the file just before could then lock the removed file, so the lock counts only when the
    locked file is still the one at the path: otherwise it is opened again.
    """
    for _ in range(LOCK_ATTEMPTS):
        handle = open(path, "a+")  # noqa: SIM115 (closed by the caller, or below)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise PhanesError(f"{path.parent}: another `phanes screen` is writing to this folder") from exc
        held = os.fstat(handle.fileno())
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return handle
        handle.close()
    raise PhanesError(f"{path}: the lock file keeps being removed; is another program deleting it?")


@contextmanager
def run_lock(layout: OutputLayout) -> Iterator[None]:
    """One run per OUT at a time; the OS drops the lock when the process dies, even on SIGKILL.

    The lock file is removed at the end, while still locked (`_take_lock` says why that is safe); one
    left by a killed run is harmless and taken over by the next.
    """
    handle = _take_lock(layout.lock)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a folder made read-only meanwhile: the file stays, harmless
            layout.lock.unlink(missing_ok=True)
        handle.close()


def _join(address: str, timeout: float, common: dict[str, Any]) -> None:
    """`ray.init(address)` in a daemon thread; a PhanesError naming the address if it takes over `timeout` s."""
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, **common)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=connect, name="phanes-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise PhanesError(f"the Ray cluster at {address} did not answer within {timeout:g} s (--connect-timeout); "
                          "check that it is running and reachable from this machine")
    if errors:
        raise errors[0]


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """While Ray starts up in this process: no message (with a remote traceback) on stderr per retried call.

    The run reports how each volume ended in one line or one failure row and logs replaced actors; Ray
    reads its settings from the environment when the driver connects, so the variable is set only for
    that moment, and a value the user set is kept.
    """
    name = "RAY_enable_output_error_log_if_still_retry"
    before = os.environ.get(name)
    os.environ.setdefault(name, "0")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


# Ray's start-up notices that are nothing for the user to act on, by the logger that emits them: a local instance
# uses token authentication (a default); `_join` connects from a thread, so Ray cannot set its SIGTERM handler
# (phanes sets its own right after, `stop_on_sigterm`).
_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray._private.worker": "SIGTERM handler is not set because current thread is not the main thread",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def _quiet_startup() -> Iterator[None]:
    """Start-up notices that are not the user's business stay out of the output; Ray's real warnings (token
    authentication disabled, a token missing or wrong) still show."""
    filters = [(logging.getLogger(name), _DropNotice(text)) for name, text in _NOTICES.items()]
    for logger, notice in filters:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger, notice in filters:
            logger.removeFilter(notice)


def local_cpus() -> int:
    """CPUs this process may use: its affinity (taskset, SLURM's and containers' cpusets), capped by a cgroup v2
    CPU quota; what a local Ray instance offers the plan (Ray itself would count every core of the machine)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


@contextmanager
def ray_session(options: ScreenOptions) -> Iterator[None]:
    """Use the caller's Ray session, join a cluster, or start (and later stop) a local instance."""
    if ray.is_initialized():
        yield
        return
    level = logging.ERROR if options.quiet else logging.WARNING
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": level}
    if options.node_ip is not None:
        common["_node_ip_address"] = options.node_ip
    with _quiet_retries(), _quiet_startup():
        if options.address is None:
            if options.object_store_mb is not None:
                common["object_store_memory"] = options.object_store_mb * 2**20
            ray.init(include_dashboard=False, num_cpus=local_cpus(), **common)
        else:
            _join(options.address, options.connect_timeout, common)
    stop_on_sigterm()  # ray.init replaced the SIGTERM handler by one that exits without cleaning up
    try:
        yield
    finally:
        ray.shutdown()
