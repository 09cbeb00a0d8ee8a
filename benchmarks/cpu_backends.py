"""The CPU speed target of `phanes bench`: each CPU backend against eager torch in its default memory layout.

`phanes bench` times the backends a user can pick; the baseline of the target ("the fastest CPU backend at
least 1.5x eager torch") is torch as it runs without our CPU changes, i.e. the networks in the default
(contiguous) memory layout. This runs `timing.measure` (warm-up, then interleaved repeats, median) on the
same real brain slices for that baseline, `TorchBackend` as shipped (channels-last on the CPU), ONNX
Runtime, and the gated CPU backends the bundle's export passed (ONNX Runtime with INT8 graphs, OpenVINO; a
refused one is listed with its reason), and prints slices/s, the network vs pre/post split and the speed-up
over the baseline. A second table times each graph alone per backend (one batch, the fastest of `--graph-repeats`
interleaved calls: on a busy machine the minimum is the figure least disturbed by other work), which is how
`quantise.INT8_GRAPHS` was chosen. `--backend auto` does not follow these tables: it measures the usable
backends on the machine that runs (`runtimes.measured`).
Usage: python benchmarks/cpu_backends.py BUNDLE [--slices 64] [--repeats 3] [--graph-repeats 10]
(BUNDLE with ONNX graphs: `python benchmarks/untrained_bundle.py configs/cpu.yaml B && phanes export --bundle B`)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.runtimes import GATED_BACKENDS
from phanes_cli.runtimes.artefacts import ArtefactError
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.select import build_backend, check_backend
from phanes_cli.runtimes.timing import measure

Call = Callable[[Backend], torch.Tensor]


def _gated(bundle: Bundle, device: torch.device) -> dict[str, Backend]:
    """The gated backends this bundle may run; a refused one is printed with its reason."""
    usable: dict[str, Backend] = {}
    for name in GATED_BACKENDS:
        try:
            check_backend(name, bundle, device)
            usable[name] = build_backend(name, bundle, device, None)
        except ArtefactError as exc:
            print(f"{name}: not measured ({exc})")
    return usable


def graph_calls(x: torch.Tensor) -> dict[str, Call]:
    """Each network as the pipeline calls it, on one batch of real slices (a fixed random inpainting mask)."""
    mask = (torch.rand_like(x, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    return {"stage 1": lambda b: b.reconstruct(x), "stage 2": lambda b: b.inpaint(x * (1 - mask) + mask, mask),
            "LPIPS": lambda b: b.lpips(x, x.flip(0))}


def graph_seconds(backends: dict[str, Backend], x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Per backend and graph: the fastest of `repeats` calls, backends and graphs taking turns."""
    calls = graph_calls(x)
    best: dict[str, dict[str, float]] = {name: {} for name in backends}
    for _ in range(repeats + 1):  # the first round warms up and is timed too; the minimum ignores it
        for name, backend in backends.items():
            for graph, call in calls.items():
                start = time.perf_counter()
                call(backend)
                best[name][graph] = min(best[name].get(graph, float("inf")), time.perf_counter() - start)
    return best


def print_graph_table(seconds: dict[str, dict[str, float]], batch: int) -> None:
    table = Table(title=f"each graph alone, batch of {batch} real slices, fastest call")
    for column in ("backend", "stage 1 s", "stage 2 s", "LPIPS s", "vs onnxruntime (stage 1 / 2 / LPIPS)"):
        table.add_column(column)
    base = seconds["onnxruntime"]
    for name, row in seconds.items():
        ratios = " / ".join(f"{base[g] / row[g]:.2f}x" for g in row)
        table.add_row(name, *(f"{row[g]:.3f}" for g in row), ratios)
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--graph-repeats", type=int, default=10)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle, require_calibration=False)
    device = torch.device("cpu")
    x, brain = brain_slices(bundle.config.preprocess, args.slices)
    shipped = build_backend("torch", bundle, device, None)
    plain = build_backend("torch", bundle, device, None)
    plain.networks = plain.networks.to(memory_format=torch.contiguous_format)  # type: ignore[attr-defined]
    backends: dict[str, Backend] = {"torch, default layout (eager baseline)": plain,
                                    "torch, channels-last (TorchBackend on the CPU)": shipped,
                                    "onnxruntime": build_backend("onnxruntime", bundle, device, None),
                                    **_gated(bundle, device)}
    level = reference_mask_threshold(bundle, shipped, x[:args.batch_size], brain[:args.batch_size])
    results = measure(backends, bundle, level, x, brain, args.batch_size, args.repeats)
    baseline = next(iter(results.values()))["slices_per_s"]
    table = Table(title=f"{bundle.config.name} config, {args.slices} slices, {torch.get_num_threads()} threads")
    for column in ("backend", "slices/s", "network s", "pre/post s", "pre/post vs network", "vs eager torch"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, f"{r['slices_per_s']:.1f}", f"{r['network_s']:.2f}", f"{r['other_s']:.2f}",
                      f"{100 * r['other_s'] / r['network_s']:.0f}%", f"{r['slices_per_s'] / baseline:.2f}x")
    Console(width=140).print(table)
    print_graph_table(graph_seconds(backends, x[:args.batch_size], args.graph_repeats), args.batch_size)


if __name__ == "__main__":
    main()
