"""Timing the whole slice pipeline per backend on the same slices, the backends taking turns.

Shared by `phanes bench` (64 slices, a few repeats, the table users read) and the first-use measurement behind
`--backend auto` (`runtimes.measured`: a few slices, seconds per backend). Each backend gets one warm-up
batch, then `repeats` rounds of one pass each, interleaved so a busy machine slows all alike; medians are
reported. Network time is measured around the backend's three calls (with a CUDA sync), so the figures show
where the time goes; the rest of `pipeline.run_slices` is pre/post-processing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.core.pipeline import run_slices

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
