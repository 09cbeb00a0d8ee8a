"""`phanes bench`: the whole slice pipeline per backend on the same slices, in one process.

Each backend gets one warm-up batch, then `repeats` timed passes over the same real brain slices, the
backends taking turns in each round (the median is reported). Network time is measured around the
backend's three calls (with a CUDA sync), each network on its own (stage 1, stage 2, both LPIPS passes), so the
table shows where the time goes; the rest of `pipeline.run_slices` is pre/post-processing.
The result goes to BUNDLE/engines/bench.json under the device type, sealed into the bundle, where
`auto` reads which CPU backend was fastest.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, check_writable, load_bundle, seal_index
from phanes_cli.core.pipeline import run_slices
from phanes_cli.errors import PhanesError
from phanes_cli.infra.atomic import write_json
from phanes_cli.runtimes import BACKENDS, validate_backend_name
from phanes_cli.runtimes.artefacts import BENCH_FILE, engines_dir
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.select import build_backend, check_backend

NETWORKS = ("stage1", "stage2", "lpips")  # the backend's three calls, as named in bench.json ("<name>_s")


class TimedBackend:
    """A backend proxy that adds up the wall time spent inside each network."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.seconds = dict.fromkeys(NETWORKS, 0.0)

    def _timed(self, network: str, call: Callable[..., Tensor], *args: Tensor) -> Tensor:
        start = time.perf_counter()
        out = call(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[network] += time.perf_counter() - start
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._timed("stage1", self.inner.reconstruct, x)

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self._timed("stage2", self.inner.inpaint, masked, mask)

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self._timed("lpips", self.inner.lpips, a, b)


def _one_pass(backend: TimedBackend, bundle: Bundle, mask_threshold: float, x: Tensor, brain: Tensor,
              batch_size: int) -> tuple[float, dict[str, float]]:
    """(total seconds, seconds per network) of the pipeline over every slice, outputs brought back to the CPU."""
    backend.seconds = dict.fromkeys(NETWORKS, 0.0)
    start = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        maps = run_slices(x[i:i + batch_size], brain[i:i + batch_size], backend, bundle.config, mask_threshold)
        maps.anomaly.cpu()
    return time.perf_counter() - start, dict(backend.seconds)


def _summary(runs: list[tuple[float, dict[str, float]]], n: int) -> dict[str, float]:
    """Medians over the passes: totals, the networks' sum and each network (whose medians need not add up)."""
    total = statistics.median(r[0] for r in runs)
    network = statistics.median(sum(r[1].values()) for r in runs)
    parts = {f"{name}_s": statistics.median(r[1][name] for r in runs) for name in NETWORKS}
    return {"slices_per_s": n / total, "total_s": total, "network_s": network, **parts, "other_s": total - network,
            "overhead_pct": 100.0 * (total - network) / max(network, 1e-9)}


def measure(backends: dict[str, Backend], bundle: Bundle, mask_threshold: float, x: Tensor, brain: Tensor,
            batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Warm-up, then `repeats` rounds of one pass per backend (interleaved, so a busy machine slows all alike)."""
    timed = {name: TimedBackend(b) for name, b in backends.items()}
    for backend in timed.values():
        _one_pass(backend, bundle, mask_threshold, x[:batch_size], brain[:batch_size], batch_size)
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, backend in timed.items():
            runs[name].append(_one_pass(backend, bundle, mask_threshold, x, brain, batch_size))
    return {name: _summary(r, x.shape[0]) for name, r in runs.items()}


def bench(folder: str | Path, backends: list[str] | None = None, n_slices: int = 64, repeats: int = 3,
          batch_size: int = 32, device: str = "cpu", lpips_weights: str | None = None,
          report: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark each usable backend on `device`; returns and records the bench.json section for that device."""
    dev = select_device(device)
    bundle = load_bundle(check_writable(folder), require_calibration=False)
    names = [validate_backend_name(b) for b in (backends or list(BACKENDS))]
    x, brain = (t.to(dev) for t in brain_slices(bundle.config.preprocess, n_slices))
    reference = build_backend("torch", bundle, dev, lpips_weights)
    level = reference_mask_threshold(bundle, reference, x[:batch_size], brain[:batch_size])
    results: dict[str, Any] = {}
    usable: dict[str, Backend] = {}
    for name in names:
        try:
            check_backend(name, bundle, dev)
            usable[name] = reference if name == "torch" else build_backend(name, bundle, dev, lpips_weights)
        except PhanesError as exc:
            results[name] = {"skipped": str(exc)}
            report(f"{name}: skipped ({exc})")
    measured = measure(usable, bundle, level, x, brain, batch_size, repeats)
    results.update(measured)
    section = {"fastest": max(measured, key=lambda k: measured[k]["slices_per_s"]) if measured else None,
               "results": {name: results[name] for name in names}, "slices": n_slices, "repeats": repeats,
               "batch_size": batch_size, "threads": torch.get_num_threads(), "host": platform.node(),
               "machine": platform.machine(), "cpu_count": _cpu_count(),
               "measured": datetime.now(timezone.utc).isoformat()}
    _record(bundle, dev.type, section)
    return section


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _record(bundle: Bundle, device_type: str, section: dict[str, Any]) -> None:
    """Merge this device's section into engines/bench.json and re-seal the bundle."""
    path = engines_dir(bundle.path) / BENCH_FILE
    previous: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**previous, device_type: section})
    seal_index(bundle.path)


def format_table(section: dict[str, Any]) -> list[str]:
    """Plain-text rows: backend, slices/s, network s (stage 1, stage 2, LPIPS), pre/post s, overhead % (skipped
    backends say why). A record written before the per-network split shows dashes there."""
    rows = [f"{'backend':<16} {'slices/s':>9} {'network s':>10} {'stage 1 s':>10} {'stage 2 s':>10} {'LPIPS s':>8} "
            f"{'pre/post s':>11} {'overhead':>9}"]
    for name, r in section["results"].items():
        if "skipped" in r:
            rows.append(f"{name:<16} skipped: {r['skipped']}")
            continue
        parts = [f"{r[f'{n}_s']:.3f}" if isinstance(r.get(f"{n}_s"), float) else "-" for n in NETWORKS]
        rows.append(f"{name:<16} {r['slices_per_s']:>9.2f} {r['network_s']:>10.3f} {parts[0]:>10} {parts[1]:>10} "
                    f"{parts[2]:>8} {r['other_s']:>11.3f} {r['overhead_pct']:>8.1f}%")
    return rows
