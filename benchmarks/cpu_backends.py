"""The CPU speed target of `phanes bench`: each CPU backend against eager torch in its default memory layout.

`phanes bench` times the backends a user can pick; the baseline of the target ("the fastest CPU backend at
least 1.5x eager torch") is torch as it runs without our CPU changes, i.e. the networks in the default
(contiguous) memory layout. This runs `bench.measure` (warm-up, then interleaved repeats, median) on the
same real brain slices for that baseline, `TorchBackend` as shipped (channels-last on the CPU) and ONNX
Runtime, and prints slices/s, the network vs pre/post split and the speed-up over the baseline.
Usage: python benchmarks/cpu_backends.py BUNDLE [--slices 64] [--repeats 3]
(BUNDLE with ONNX graphs: `python benchmarks/untrained_bundle.py configs/cpu.yaml B && phanes export --bundle B`)
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import load_bundle
from phanes_cli.runtimes.bench import brain_slices, build_backend, measure, reference_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle, require_calibration=False)
    device = torch.device("cpu")
    x, brain = brain_slices(bundle.config.preprocess, args.slices)
    shipped = build_backend("torch", bundle, device, None)
    plain = build_backend("torch", bundle, device, None)
    plain.networks = plain.networks.to(memory_format=torch.contiguous_format)  # type: ignore[attr-defined]
    backends: dict[str, Backend] = {"torch, default layout (eager baseline)": plain,
                                    "torch, channels-last (TorchBackend on the CPU)": shipped,
                                    "onnxruntime": build_backend("onnxruntime", bundle, device, None)}
    calibration = reference_calibration(bundle, shipped, x[:args.batch_size], brain[:args.batch_size])
    results = measure(backends, bundle, calibration, x, brain, args.batch_size, args.repeats)
    baseline = next(iter(results.values()))["slices_per_s"]
    table = Table(title=f"{bundle.config.name} config, {args.slices} slices, {torch.get_num_threads()} threads")
    for column in ("backend", "slices/s", "network s", "pre/post s", "pre/post vs network", "vs eager torch"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, f"{r['slices_per_s']:.1f}", f"{r['network_s']:.2f}", f"{r['other_s']:.2f}",
                      f"{100 * r['other_s'] / r['network_s']:.0f}%", f"{r['slices_per_s'] / baseline:.2f}x")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
