"""Which graphs are worth a cheaper precision: each exported graph alone in INT8 (ONNX Runtime) or bf16 (OpenVINO),
its speed against the same runtime in fp32 and the export gate's lesion-mask figures.

For every graph (stage 1, stage 2, LPIPS) this reduces that graph only, exactly as `phanes export` builds the
candidate: `--precision int8` quantises it (`runtimes.quantise`, calibrated on the shipped calibration brains) and
runs it in ONNX Runtime; `--precision bf16` compiles it at OpenVINO's bf16 inference precision (`OpenVINOBackend`'s
`bf16_graphs`; needs a CPU with native bf16, AVX512-BF16 or AMX). It times the graph against the same runtime's
fp32 one (one batch of 32 real slices of the gate brains, a random 10% inpainting mask for stage 2, the fastest
of `--repeats` interleaved calls, the process's thread count) and runs the gate's lesion-mask comparison on the
gate brains (`runtimes.parity.mask_figures`, fp32 ONNX Runtime as reference). `quantise.INT8_GRAPHS` and
`openvino.BF16_GRAPHS` hold the graphs that were faster and passed (docs/backends.md).
Usage: python benchmarks/reduced_graphs.py BUNDLE --precision int8|bf16 [--repeats 10]   (BUNDLE exported)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle, load_bundle
from phanes_cli.runtimes.artefacts import artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.parity import gate_reference, mask_figures
from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices

CPU = torch.device("cpu")


def calls(backend: Backend, x: Tensor) -> dict[str, Callable[[], Tensor]]:
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


def candidates(precision: str, bundle: Bundle, graphs: dict[str, bytes]) -> tuple[Backend, dict[str, Backend]]:
    """The fp32 backend of the runtime that runs `precision`, and per graph the backend with that graph reduced."""
    if precision == "int8":
        from phanes_cli.runtimes.quantise import calibration_feeds, quantise_graph

        fp32 = OnnxRuntimeBackend(graphs, CPU)
        with torch.inference_mode():
            feeds = calibration_feeds(bundle, fp32)
        return fp32, {name: OnnxRuntimeBackend({**graphs, name: quantise_graph(graphs[name], feeds[name])}, CPU,
                                               name=f"int8 {name}") for name in graphs}
    from phanes_cli.runtimes.openvino import OpenVINOBackend, require_bf16

    require_bf16()
    return OpenVINOBackend(graphs, CPU), {name: OpenVINOBackend(graphs, CPU, bf16_graphs=(name,)) for name in graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--precision", choices=("int8", "bf16"), required=True)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle, require_calibration=False)
    graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
    ref = gate_reference(bundle, OnnxRuntimeBackend(graphs, CPU))
    fp32, reduced = candidates(args.precision, bundle, graphs)
    x, _ = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS, 11)
    print(f"{torch.get_num_threads()} threads, {fp32.name}; gate levels: {ref.levels}")
    levels = " | ".join(f"lesion masks ({level})" for level in ref.levels)
    print(f"| graph in {args.precision} | fp32 s | {args.precision} s | speed-up | {levels} | gate |")
    print("| --- " * (5 + len(ref.levels)) + "|")
    for spec in GRAPHS:
        seconds = fastest([calls(fp32, x[:32])[spec.name], calls(reduced[spec.name], x[:32])[spec.name]],
                          args.repeats)
        with torch.inference_mode():
            figures, problems = mask_figures(bundle, reduced[spec.name], ref)
        masks = " | ".join(f"agreement {r['agreement']:.3%}, Dice {r['dice']:.4f}" for r in figures.values())
        print(f"| {spec.name} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[0] / seconds[1]:.2f}x | {masks} | "
              f"{'passes' if not problems else 'FAILS'} |", flush=True)


if __name__ == "__main__":
    main()
