"""What the screening driver costs at cohort scale: N tiny volumes through the real Ray path (`screen`).

Volumes are 16x16x12 voxels (a few kB each) and the networks the smallest config there is (32 px
slices, a handful of channels), so the stages are short and the cost of orchestration shows. Every
cohort size gets a fresh cohort and OUT folder; one local Ray instance serves them all, warmed up by a
5-volume run that starts Ray's worker processes. Each run has one inference actor and one volume in
flight, so the stages run one after another. Columns:

- stages ms/vol: seconds spent inside the decode, inference and write stages (`stages_s` in run.json),
  per volume; "of which commit" is the part the volume rows cannot time themselves (their `runtime_s`
  stops before the rows and the done marker are written and fsynced);
- orchestration ms/vol: the streaming loop's wall time (`stream_s` in run.json, after the actors are up)
  minus the stage seconds, per volume: scheduling, object transfers, worker start-up and the driver's
  own work;
- driver CPU ms/vol: CPU time of the driver process (all its threads, Ray's included) per volume;
- driver peak MB: resident memory of this process, sampled every 10 ms in a thread during the run,
  and its growth over the smallest cohort;
- consolidate s: one more `consolidate` of the part files into the three tables (what every run ends with).

Targets: driver memory flat within 50 MB from 100 to 5,000 volumes, orchestration under 20 ms per
volume, consolidation under 10 s at 5,000. Timings depend on how busy the machine's CPUs are.
Usage: python benchmarks/scale_bench.py [--volumes 100,1000,5000] [--node-ip 127.0.0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import ray
import torch
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from phanes_cli.config import AOTConfig, PhanesConfig, PreprocessConfig, RAConfig
from phanes_cli.core.bundle import save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.models import AOTGenerator, SoftIntroVAE
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions

SHAPE = (16, 16, 12)
PAGE = os.sysconf("SC_PAGE_SIZE")


def tiny_config() -> PhanesConfig:
    return PhanesConfig(name="scale-bench", ra=RAConfig(channels=(4, 8, 8, 16, 16), latent_dim=8),
                        aot=AOTConfig(base_channels=4, channels=8, blocks=1, rates=(1, 2), disc_channels=(4, 8, 8, 16)),
                        preprocess=PreprocessConfig(image_size=32, min_brain_fraction=0.2))


def write_cohort(folder: Path, n: int, seed: int = 0) -> None:
    """n small heads: an ellipsoid brain with its own smooth texture, 2 mm voxels."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        texture = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE), 1.0)
        data = ((100 + 20 * texture) * brain).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), str(folder / f"v{i:05d}.nii.gz"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident set size of this process while the block runs, sampled in a thread."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(work: Path, bundle: Path, n: int) -> dict[str, float]:
    """Screen a fresh cohort of n volumes; the figures of one table row."""
    cohort, out = Path(tempfile.mkdtemp(prefix="cohort", dir=work)), Path(tempfile.mkdtemp(prefix="out", dir=work))
    write_cohort(cohort, n)
    cpu = cpu_seconds()
    with PeakRSS() as rss:
        summary = screen([str(cohort)], ScreenOptions(bundle=bundle, out=out, num_actors=1, max_in_flight=1,
                                                      batch_size=64, quiet=True))
    cpu = cpu_seconds() - cpu
    if summary.done != n:
        raise RuntimeError(f"{n - summary.done} of {n} volumes were not screened; see {out / 'failures.parquet'}")
    times = json.loads((out / "run.json").read_text())["ray"]
    stream_s, stages_s = times["stream_s"], times["stages_s"]
    rows_s = float(pd.read_parquet(out / "volumes.parquet", columns=["runtime_s"])["runtime_s"].sum())
    started = time.perf_counter()
    consolidate(OutputLayout(out))
    consolidate_s = time.perf_counter() - started
    return {"n": n, "wall_s": summary.seconds, "stream_s": stream_s, "stages_ms": 1000 * stages_s / n,
            "commit_ms": 1000 * (stages_s - rows_s) / n, "orchestration_ms": 1000 * (stream_s - stages_s) / n,
            "driver_cpu_ms": 1000 * cpu / n,
            "peak_mb": rss.peak / 2**20, "consolidate_s": consolidate_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", default="100,1000,5000", help="comma-separated cohort sizes")
    parser.add_argument("--node-ip", default=None, help="address for the local Ray instance (default: Ray's choice)")
    args = parser.parse_args()
    sizes = sorted(int(v) for v in args.volumes.split(","))

    console = Console(width=140)
    cpus = max(2, len(os.sched_getaffinity(0)))
    init: dict[str, object] = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}
    if args.node_ip:
        init["_node_ip_address"] = args.node_ip
    rows = []
    with tempfile.TemporaryDirectory(prefix="phanes-scale-") as tmp:
        work = Path(tmp)
        cfg = tiny_config()
        torch.manual_seed(0)
        save_bundle(work / "bundle", cfg, SoftIntroVAE(cfg.ra, cfg.preprocess.image_size), AOTGenerator(cfg.aot),
                    Calibration(mask_threshold=0.5, anomaly_threshold=0.5))
        ray.init(**init)
        try:
            measure(work, work / "bundle", 5)  # warm-up: Ray starts (and imports into) its worker processes
            for n in sizes:
                rows.append(measure(work, work / "bundle", n))
                console.print({k: round(v, 2) for k, v in rows[-1].items()})
        finally:
            ray.shutdown()
    table = Table(title=f"phanes screen at scale ({SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} volumes, 1 actor, "
                        f"1 in flight, {cpus} CPUs)")
    for column in ("volumes", "wall s", "stream s", "stages ms/vol", "of which commit", "orchestration ms/vol",
                   "driver CPU ms/vol", "driver peak MB", "growth MB", "consolidate s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['n']:,}", f"{row['wall_s']:.1f}", f"{row['stream_s']:.1f}", f"{row['stages_ms']:.1f}",
                      f"{row['commit_ms']:.1f}", f"{row['orchestration_ms']:.1f}", f"{row['driver_cpu_ms']:.1f}",
                      f"{row['peak_mb']:.0f}", f"{row['peak_mb'] - rows[0]['peak_mb']:+.0f}",
                      f"{row['consolidate_s']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
