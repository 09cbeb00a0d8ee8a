"""Which graphs are worth bf16 in OpenVINO: each exported graph compiled alone at bf16 inference precision, its
speed against its fp32 compiled model and the export gate's lesion-mask figures.

For every graph (stage 1, stage 2, LPIPS) this compiles that graph only in bf16 (`OpenVINOBackend`'s
`bf16_graphs`), times it against the fp32 compiled model (one batch of 32 real brain slices from the gate
brains, the fastest of `--repeats` interleaved calls, the process's thread count) and runs the gate's
lesion-mask comparison on the gate brains (`runtimes.parity.mask_figures`, fp32 ONNX Runtime as reference).
`runtimes.openvino.BF16_GRAPHS` holds the graphs that were faster and passed (README: Backends and export).
Needs a CPU with native bf16 arithmetic (AVX512-BF16 or AMX): elsewhere OpenVINO would compute fp32.
Usage: python benchmarks/bf16_graphs.py BUNDLE [--repeats 10]   (BUNDLE exported with `phanes export`)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from phanes_cli.core.bundle import load_bundle
from phanes_cli.runtimes.artefacts import artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS, GraphBackend
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.openvino import OpenVINOBackend, require_bf16
from phanes_cli.runtimes.parity import gate_reference, mask_figures
from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices


def calls(backend: GraphBackend, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    """One call of each graph on the batch `x` (a random inpainting mask of 10% for stage 2)."""
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    return {"stage1": lambda: backend.reconstruct(x), "stage2": lambda: backend.inpaint(x * (1 - mask) + mask, mask),
            "lpips": lambda: backend.lpips(x, x.flip(-1))}


def fastest(runs: list[Callable[[], Tensor]], repeats: int) -> list[float]:
    """The fastest of `repeats` calls of each function, the functions taking turns (the first call warms up)."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats + 1):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    require_bf16()
    bundle, cpu = load_bundle(args.bundle, require_calibration=False), torch.device("cpu")
    graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
    ref = gate_reference(bundle, OnnxRuntimeBackend(graphs, cpu))
    x, _ = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS, 11)
    fp32 = calls(OpenVINOBackend(graphs, cpu), x[:32])
    print(f"{torch.get_num_threads()} threads; gate levels: {ref.levels}")
    levels = " | ".join(f"lesion masks ({level})" for level in ref.levels)
    print(f"| graph in bf16 | fp32 s | bf16 s | speed-up | {levels} | gate |")
    print("| --- " * (5 + len(ref.levels)) + "|")
    for spec in GRAPHS:
        candidate = OpenVINOBackend(graphs, cpu, bf16_graphs=(spec.name,))
        seconds = fastest([fp32[spec.name], calls(candidate, x[:32])[spec.name]], args.repeats)
        with torch.inference_mode():
            figures, problems = mask_figures(bundle, candidate, ref)
        masks = " | ".join(f"agreement {r['agreement']:.3%}, Dice {r['dice']:.4f}" for r in figures.values())
        print(f"| {spec.name} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[0] / seconds[1]:.2f}x | {masks} | "
              f"{'passes' if not problems else 'FAILS'} |", flush=True)


if __name__ == "__main__":
    main()
