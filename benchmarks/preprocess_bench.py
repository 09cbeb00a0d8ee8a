"""Preprocessing throughput: is preparing 1 mm volumes dominated by file decoding, as it should be?

Writes N distinct 1 mm volumes (the MNI152 template shipped with phanes with noise and a random shift) to a temp
folder, then times, per volume: decode (nibabel load + validation + RAS+), brain mask, and slice
preparation. Prints a table. Usage: python benchmarks/preprocess_bench.py [--volumes 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import auto_brain_mask, prepare_volume
from phanes_cli.core.volume_io import load_volume, save_nifti
from phanes_cli.infra.packaged_data import mni152_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    template = mni152_image("t1_1mm")
    base = np.asarray(template.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig()
    timings = {"decode": 0.0, "brain mask": 0.0, "prepare slices": 0.0}
    slices = 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.volumes):
            noisy = np.roll(base, rng.integers(-3, 4, 3), axis=(0, 1, 2)) * (base > 0)
            noisy = noisy + rng.normal(0, 2, base.shape).astype(np.float32) * (base > 0)
            paths.append(save_nifti(noisy, template.affine, Path(tmp) / f"v{i:03d}.nii.gz"))
        for path in paths:
            t0 = time.perf_counter()
            vol = load_volume(path)
            t1 = time.perf_counter()
            brain = auto_brain_mask(vol.data)
            t2 = time.perf_counter()
            prepared = prepare_volume(vol.data, brain, cfg, vol.zooms)
            t3 = time.perf_counter()
            timings["decode"] += t1 - t0
            timings["brain mask"] += t2 - t1
            timings["prepare slices"] += t3 - t2
            slices += prepared.slices.shape[0]
    total = sum(timings.values())
    table = Table(title=f"Preprocessing {args.volumes} volumes of {base.shape} at 1 mm "
                        f"({slices} slices, {args.threads} threads)")
    for col in ("step", "total s", "ms / volume", "share"):
        table.add_column(col, justify="right")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.1f}", f"{1000 * seconds / args.volumes:.0f}", f"{100 * seconds / total:.0f}%")
    table.add_row("all", f"{total:.1f}", f"{1000 * total / args.volumes:.0f}", "100%")
    Console().print(table)


if __name__ == "__main__":
    main()
