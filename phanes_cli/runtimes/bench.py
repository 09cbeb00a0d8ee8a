"""`phanes bench`: the whole slice pipeline per backend on the same slices, in one process.

Each backend gets one warm-up batch, then `repeats` timed passes over the same real brain slices, the
backends taking turns in each round (the median is reported; `runtimes.timing`). Network time is measured
around the backend's three calls (with a CUDA sync), each network on its own (stage 1, stage 2, both LPIPS
passes), so the table shows where the time goes; the rest of `pipeline.run_slices` is pre/post-processing.
The result goes to BUNDLE/engines/bench.json under the device type, sealed into the bundle (a record of where
and how it was measured); CPU figures also go to this machine's measurement cache (`runtimes.measured`),
which `--backend auto` chooses by at this thread count.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, check_writable, load_bundle, seal_index
from phanes_cli.errors import PhanesError
from phanes_cli.infra.atomic import write_json
from phanes_cli.runtimes import BACKENDS, validate_backend_name
from phanes_cli.runtimes.artefacts import BENCH_FILE, engines_dir
from phanes_cli.runtimes.measured import Speeds, record
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.select import build_backend, check_backend
from phanes_cli.runtimes.timing import NETWORKS, measure


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
    when, threads = datetime.now(timezone.utc).isoformat(), torch.get_num_threads()
    section = {"fastest": max(measured, key=lambda k: measured[k]["slices_per_s"]) if measured else None,
               "results": {name: results[name] for name in names}, "slices": n_slices, "repeats": repeats,
               "batch_size": batch_size, "threads": threads, "host": platform.node(),
               "machine": platform.machine(), "cpu_count": _cpu_count(), "measured": when}
    _record(bundle, dev.type, section)
    if dev.type == "cpu" and measured:
        speeds = Speeds({name: r["slices_per_s"] for name, r in measured.items()}, measured=when)
        try:
            record(bundle, threads, speeds, "phanes bench")
        except OSError as exc:
            report(f"the figures are not cached for --backend auto ({exc}); it measures at first use")
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
