"""Screening throughput on this machine: volumes per minute with 1 and 2 inference actors, and where the
time goes (decode / inference / write, from the per-volume timings in volumes.parquet).

Writes N distinct 2 mm MNI-like volumes (the MNI152 template shipped with phanes with a smooth intensity field and a
random shift) and an untrained bundle of the demo config (speed does not depend on the weights), starts
one local Ray instance, then screens the cohort once per actor count into a fresh folder. "vol/min" is
cohort size over the screen() wall time, which includes starting the actors and loading the model.
Usage: python benchmarks/screen_bench.py [--volumes 10] [--actors 1 2] [--node-ip 127.0.0.2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from phanes_cli.config import load_config
from phanes_cli.core.bundle import save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.volume_io import save_nifti
from phanes_cli.infra.packaged_data import mni152_image
from phanes_cli.models import AOTGenerator, SoftIntroVAE
from phanes_cli.screening.engine import ScreenOptions, screen

ROOT = Path(__file__).resolve().parents[1]


def write_cohort(folder: Path, n: int, seed: int = 0) -> None:
    template = mni152_image("t1_2mm")
    base = np.asarray(template.get_fdata(), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for i in range(n):
        field = ndimage.gaussian_filter(rng.normal(0, 1, base.shape), 8)
        field = 1.0 + 0.15 * field / (np.abs(field).max() + 1e-6)
        data = np.roll(base * field, tuple(rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        save_nifti(data.astype(np.float32), template.affine, folder / f"sub{i:03d}.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=10)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--node-ip", default=None, help="address for the local Ray instance (default: Ray's choice)")
    args = parser.parse_args()

    console = Console(width=140)
    cpus = max(2, len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="phanes-bench-") as tmp:
        work = Path(tmp)
        write_cohort(work / "cohort", args.volumes)
        cfg = load_config(args.config)
        torch.manual_seed(0)
        save_bundle(work / "bundle", cfg, SoftIntroVAE(cfg.ra, cfg.preprocess.image_size), AOTGenerator(cfg.aot),
                    Calibration(mask_threshold=0.5, anomaly_threshold=0.5))
        init: dict[str, object] = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}
        if args.node_ip:
            init["_node_ip_address"] = args.node_ip
        started = time.perf_counter()
        ray.init(**init)
        console.print(f"local Ray instance with {cpus} CPUs started in {time.perf_counter() - started:.1f} s; "
                      f"config {cfg.name}, {args.volumes} volumes of 91x109x91 (2 mm)")
        table = Table(title="phanes screen throughput (CPU)")
        for column in ("actors", "CPU/actor", "wall s", "vol/min", "slices/vol", "decode s/vol", "inference s/vol",
                       "write s/vol", "decode %", "inference %", "write %"):
            table.add_column(column, justify="right")
        try:
            for n in args.actors:
                per_actor = min(1.0, (cpus - 1) / n)
                summary = screen([str(work / "cohort")], ScreenOptions(
                    bundle=work / "bundle", out=work / f"out{n}", num_actors=n, cpus_per_actor=per_actor, quiet=True))
                volumes = pd.read_parquet(work / f"out{n}" / "volumes.parquet")
                stages = volumes[["decode_s", "inference_s", "write_s"]].mean()
                share = 100 * stages / stages.sum()
                table.add_row(str(n), f"{per_actor:g}", f"{summary.seconds:.1f}",
                              f"{60 * summary.done / summary.seconds:.1f}",
                              f"{volumes['slices_processed'].mean():.0f}",
                              *(f"{stages[k]:.2f}" for k in ("decode_s", "inference_s", "write_s")),
                              *(f"{share[k]:.0f}" for k in ("decode_s", "inference_s", "write_s")))
        finally:
            ray.shutdown()
        console.print(table)
        console.print("decode/inference/write are per-volume stage times measured inside the tasks and the actor; "
                      "stages of different volumes overlap, so they add up to more than wall time / volumes.")


if __name__ == "__main__":
    main()
