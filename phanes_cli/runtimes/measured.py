"""What the CPU backends measured on this machine: the figures `--backend auto` chooses by.

A backend's speed depends on the CPU (bf16 without AMX, AVX-512 or not) and the thread count more than on
any order fixed in advance, and a user never runs `phanes bench` before `phanes screen`. So the first time a
bundle runs under `auto` on a CPU at a thread count, every usable CPU backend runs the whole slice pipeline
on a few real slices of a shipped brain (`timing.measure`, interleaved, a few seconds each), and the figures
are kept in the user cache (`first_use.cache_root()`/measured/, one file per bundle content key, one entry per
CPU and thread count); `phanes bench` stores its own figures there too. The actors that start together on a
node measure once: the first takes a lock, the others wait and read its entry. An entry is trusted only when
it is well formed, was measured with the runtime versions installed now and covers every backend usable now;
otherwise the backends are measured again. A cache that cannot be written costs only the re-measurement.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.infra.atomic import write_json
from phanes_cli.infra.versions import package_version
from phanes_cli.runtimes.first_use import cache_root
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices
from phanes_cli.runtimes.timing import measure

SLICES = 16  # evenly spaced over one shipped brain: top, middle and bottom, as a volume has them
BATCH = 8
REPEATS = 2
RUNTIMES = ("torch", "onnxruntime", "openvino")  # versions an entry was measured with


@dataclass
class Speeds:
    """Slices per second of each backend measured here, the ones that failed to run (with why), and when."""

    slices_per_s: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)
    measured: str = ""

    def ranked(self) -> list[str]:
        """The measured backends, fastest first."""
        return sorted(self.slices_per_s, key=lambda name: -self.slices_per_s[name])


def cpu_identity() -> str:
    """This CPU: its model name with family, model, stepping and a digest of its feature flags (two CPUs sold
    under one name, e.g. "AMD EPYC" in a VM, differ there)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:8]
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, " \
           f"stepping {fields.get('stepping', '?')}, flags {flags})"


def cache_file(bundle: Bundle) -> Path:
    return cache_root() / "measured" / f"{bundle.content_key[:32]}.json"


def entry_key(threads: int) -> str:
    return f"{cpu_identity()} | {threads} thread(s)"


def _versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in RUNTIMES}


def read_entries(bundle: Bundle) -> dict[str, Any]:
    """Every entry of this bundle's file, by key; {} when there is none or it is not a JSON object of objects."""
    try:
        data = json.loads(cache_file(bundle).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _speeds_of(entry: Any, usable: list[str] | None) -> Speeds | None:
    """The entry's figures when they can be trusted for these usable backends (None: all it holds; module
    docstring), else None."""
    if not isinstance(entry, dict) or entry.get("versions") != _versions():
        return None
    speeds, failed = entry.get("slices_per_s"), entry.get("failed", {})
    if not isinstance(speeds, dict) or not isinstance(failed, dict):
        return None
    good = {k: float(v) for k, v in speeds.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}
    if len(good) != len(speeds) or any(name not in good and name not in failed for name in usable or []):
        return None
    kept = {k: v for k, v in good.items() if usable is None or k in usable}
    return Speeds(kept, {k: str(v) for k, v in failed.items()}, measured=str(entry.get("measured", "")))


def cached_speeds(bundle: Bundle, usable: list[str], threads: int) -> Speeds | None:
    """Trusted figures of these backends on this CPU at `threads` threads, or None (not measured yet here)."""
    return _speeds_of(read_entries(bundle).get(entry_key(threads)), usable)


def record(bundle: Bundle, threads: int, speeds: Speeds, source: str) -> None:
    """Store figures measured here (`source`: first use, phanes bench) as this CPU's entry at `threads` threads."""
    entries = read_entries(bundle)
    old = _speeds_of(entries.get(entry_key(threads)), None)  # figures of other backends measured before are kept
    figures = {**(old.slices_per_s if old else {}), **speeds.slices_per_s}
    failed = {k: v for k, v in {**(old.failed if old else {}), **speeds.failed}.items() if k not in speeds.slices_per_s}
    entries[entry_key(threads)] = {"cpu": cpu_identity(), "threads": threads, "slices_per_s": figures,
                                   "failed": failed, "versions": _versions(), "source": source,
                                   "measured": speeds.measured}
    write_json(cache_file(bundle), {"bundle_content_key": bundle.content_key, "entries": entries})


@contextmanager
def _measuring(bundle: Bundle) -> Iterator[None]:
    """One measurement per bundle at a time on this machine; without a writable cache, no lock is needed."""
    path = cache_file(bundle).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - held for the block, released when closed or the process dies
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def measure_here(bundle: Bundle, usable: list[str], build: Callable[[str], Backend],
                 announce: Callable[[str], object] = lambda line: None) -> tuple[Speeds, dict[str, Backend]]:
    """The figures of `usable` on this CPU at the process's thread count: from the cache, else measured now (said
    first through `announce`) and stored (with the backends built for it, so the chosen one is not built twice)."""
    threads = torch.get_num_threads()
    with _measuring(bundle):
        cached = cached_speeds(bundle, usable, threads)
        if cached is not None:
            return cached, {}
        announce(f"timing {', '.join(usable)} at {threads} thread(s) on this CPU (once per model and CPU)")
        built: dict[str, Backend] = {}
        failed: dict[str, str] = {}
        for name in usable:
            try:
                built[name] = build(name)
            except Exception as exc:  # a runtime that cannot compile this bundle here is not chosen
                failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        speeds = Speeds(_time(bundle, built), failed, measured=datetime.now(timezone.utc).isoformat())
        with suppress(OSError):  # not cached: measured again next time, nothing else is lost
            record(bundle, threads, speeds, "first use")
    return speeds, built


def _time(bundle: Bundle, backends: dict[str, Backend]) -> dict[str, float]:
    """Slices per second of each backend over SLICES real slices (`timing.measure`)."""
    if not backends:
        return {}
    x, brain = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS[:1], SLICES)
    reference = backends.get("torch") or next(iter(backends.values()))
    level = reference_mask_threshold(bundle, reference, x[:BATCH], brain[:BATCH])
    figures = measure(backends, bundle, level, x, brain, BATCH, REPEATS)
    return {name: round(r["slices_per_s"], 3) for name, r in figures.items()}
