"""Pre/post-processing of one slice batch: Triton kernels vs their torch references vs the reference code's style.

Stages (all of `ops`, on one (N, 1, S, S) batch of real MNI152 slices):
  clahe        CLAHE of x and of its reconstruction (2N images)
  mask step    stage 1 map + threshold + dilation (`ops.stage1_map` + `ops.binary_mask`)
  final step   composition + anomaly map (`ops.compose` + `ops.anomaly_map`)
"reference style" is how the authors' code does it: one image at a time on the CPU with skimage CLAHE,
numpy percentiles and scipy Gaussian filters, after a host copy of each image. The torch reference runs on
the GPU when there is one (else the CPU); Triton only on CUDA. With --networks, the paper-size networks'
time for the same batch (RA, AOT-GAN, two LPIPS passes) is measured too, for the 10% target.
Prints a table and writes JSON. Usage: python benchmarks/kernels_bench.py [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.ndimage import gaussian_filter
from skimage.exposure import equalize_adapthist

from phanes_cli.config import MaskConfig, PhanesConfig, PreprocessConfig
from phanes_cli.core import ops
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.errors import WeightsError
from phanes_cli.infra.packaged_data import mni152_image
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend

Inputs = dict[str, torch.Tensor]


def make_inputs(batch: int, size: int, device: torch.device) -> Inputs:
    """Real slices and brain masks, a stand-in reconstruction and LPIPS maps (speed does not depend on values)."""
    data = np.asarray(mni152_image("t1_1mm").dataobj, dtype=np.float32)
    prepared = prepare_volume(data, None, PreprocessConfig(image_size=size), (1.0, 1.0, 1.0))
    pick = np.resize(np.arange(prepared.slices.shape[0]), batch)
    gen = torch.Generator().manual_seed(0)
    x = prepared.slices[pick]
    noise = [torch.rand(x.shape, generator=gen) for _ in range(3)]
    tensors = {"x": x, "brain": prepared.brain[pick], "lpips": ops.gaussian_blur(noise[1], 1.0), "completed": noise[2],
               "x_cph": (ops.gaussian_blur(x, 1.5) + 0.05 * noise[0]).clamp(0, 1)}
    return {k: v.to(device).contiguous() for k, v in tensors.items()}


def torch_stages(t: Inputs, cfg: MaskConfig) -> dict[str, Callable[[], object]]:
    """The `ops` steps, run by whatever PHANES_KERNELS selects."""
    eq = {"x": ops.clahe(t["x"], cfg), "x_cph": ops.clahe(t["x_cph"], cfg)}

    def mask_step() -> torch.Tensor:
        return ops.binary_mask(ops.stage1_map(eq["x"], eq["x_cph"], t["lpips"], t["brain"], cfg), t["brain"], 0.3, cfg)

    mask = mask_step()
    return {
        "clahe": lambda: (ops.clahe(t["x"], cfg), ops.clahe(t["x_cph"], cfg)),
        "mask step": mask_step,
        "final step": lambda: ops.anomaly_map(t["x"], ops.compose(t["x"], t["completed"], mask), t["lpips"], mask,
                                              t["brain"]),
    }


def _host(t: torch.Tensor, i: int) -> np.ndarray:
    return t[i, 0].cpu().numpy().astype(np.float64)


def _style_mask(t: Inputs, cfg: MaskConfig) -> list[np.ndarray]:
    out = []
    for i in range(t["x"].shape[0]):
        a, b, lp, brain = _host(t["x"], i), _host(t["x_cph"], i), _host(t["lpips"], i), _host(t["brain"], i)
        residual = np.abs(b - a) * brain
        p = np.percentile(residual[brain > 0], cfg.norm_percentile) if (brain > 0).any() else 0.0
        ra = np.clip(residual / max(p, 1e-8), 0, 1) * gaussian_filter(lp, cfg.lpips_sigma) * brain
        raw = ((ra > 0.3) & (brain > 0)).astype(np.float64)
        out.append((gaussian_filter(raw, cfg.dilation_sigma) > cfg.dilation_threshold) * brain)
    return out


def _style_final(t: Inputs) -> list[np.ndarray]:
    out = []
    for i in range(t["x"].shape[0]):
        x, g, lp, brain = _host(t["x"], i), _host(t["completed"], i), _host(t["lpips"], i), _host(t["brain"], i)
        mask = (brain > 0) & (lp > 0.5)
        x_ph = x * (1 - mask) + g * mask
        score = np.abs(x_ph - x) * lp * mask * brain
        out.append((score >= 0.1) & (score > 0) & (brain > 0))
    return out


def reference_style(t: Inputs, cfg: MaskConfig) -> dict[str, Callable[[], object]]:
    """One image at a time on the CPU, as the authors' code does it."""
    def clahe() -> list[np.ndarray]:
        return [equalize_adapthist(_host(t[key], i), kernel_size=t["x"].shape[-1] // cfg.clahe_tiles,
                                   clip_limit=cfg.clahe_clip, nbins=cfg.clahe_bins)
                for key in ("x", "x_cph") for i in range(t["x"].shape[0])]

    return {"clahe": clahe, "mask step": lambda: _style_mask(t, cfg), "final step": lambda: _style_final(t)}


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn in ms after one warm-up call (Triton compiles there), synchronising CUDA."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def networks_ms(t: Inputs, device: torch.device, repeats: int) -> float | str:
    """The paper-size networks on this batch: reconstruction, inpainting and both LPIPS maps."""
    try:
        backend = TorchBackend(PhanesNetworks(PhanesConfig()), device)
    except WeightsError as err:
        return f"unavailable: {err}"

    def run() -> None:
        rec = backend.reconstruct(t["x"])
        backend.lpips(rec, t["x"])
        backend.lpips(backend.inpaint(t["x"], (t["lpips"] > 0.5).float()), t["x"])

    return time_ms(run, device, repeats)


def run_with(kernels: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        os.environ[ops.KERNELS_ENV] = kernels
        return fn()
    return call


def measure(batch: int, size: int, repeats: int, with_networks: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = MaskConfig()
    t = make_inputs(batch, size, device)
    os.environ[ops.KERNELS_ENV] = "torch"
    style, reference = reference_style(t, cfg), torch_stages(t, cfg)
    fast = None
    if device.type == "cuda":
        os.environ[ops.KERNELS_ENV] = "triton"
        fast = torch_stages(t, cfg)
    stages = {}
    for name in style:
        stages[name] = {
            "reference_style_ms": time_ms(style[name], torch.device("cpu"), max(1, repeats // 5)),
            "torch_ms": time_ms(run_with("torch", reference[name]), device, repeats),
            "triton_ms": time_ms(run_with("triton", fast[name]), device, repeats) if fast else None,
        }
    return {
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "batch": batch, "size": size, "device": str(device), "stages": stages,
        "networks_ms": networks_ms(t, device, repeats) if with_networks else None,
    }


def report(result: dict[str, Any]) -> Table:
    stages: dict[str, dict[str, float | None]] = result["stages"]
    table = Table(title=f"pre/post-processing of {result['batch']} slices of {result['size']} px on {result['device']}")
    for column in ("stage", "reference style (CPU, per image) ms", "torch reference ms", "triton ms", "speed-up"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    keys = ("reference_style_ms", "torch_ms", "triton_ms")
    totals: dict[str, float | None] = {k: sum(row[k] or 0.0 for row in stages.values()) or None for k in keys}
    rows: list[tuple[str, dict[str, float | None]]] = [*stages.items(), ("total", totals)]
    for name, row in rows:
        style, best = row["reference_style_ms"] or 0.0, row["triton_ms"] or row["torch_ms"]
        table.add_row(name, f"{style:.1f}", f"{row['torch_ms']:.2f}",
                      f"{row['triton_ms']:.2f}" if row["triton_ms"] else "-", f"{style / best:.1f}x" if best else "-")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", action="store_true", help="also time the paper-size networks on the batch")
    parser.add_argument("--json", type=Path, default=Path("kernels_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.batch, args.size, args.repeats, args.networks)
    console = Console()
    console.print(report(result))
    if result["networks_ms"] is not None:
        console.print(f"networks on the same batch: {result['networks_ms']} ms")
    args.json.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
