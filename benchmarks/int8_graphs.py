"""Which graphs are worth INT8: each exported graph quantised alone, its speed and the export gate's mask figures.

For every graph (stage 1, stage 2, LPIPS) this quantises that graph only, exactly as `phanes export` does
(`runtimes.quantise`, calibrated on the shipped calibration brains), times it against its fp32 graph in
ONNX Runtime (one batch of real slices, the fastest of `--repeats` interleaved calls) and runs the gate's
lesion-mask comparison on the gate brains (`runtimes.parity.mask_figures`). `quantise.INT8_GRAPHS` holds the
graphs that were faster and passed (README: Backends and export).
Usage: python benchmarks/int8_graphs.py BUNDLE [--repeats 10]   (BUNDLE exported with `phanes export`)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch

from phanes_cli.core.bundle import load_bundle
from phanes_cli.runtimes.artefacts import artefact_name, read_artefact
from phanes_cli.runtimes.graphs import GRAPHS
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend, session_options
from phanes_cli.runtimes.parity import gate_reference, mask_figures
from phanes_cli.runtimes.quantise import calibration_feeds, quantise_graph


def fastest(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], repeats: int) -> list[float]:
    """The fastest of `repeats` calls of each session on `feed`, the sessions taking turns."""
    best = [float("inf")] * len(sessions)
    for _ in range(repeats + 1):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundle, cpu = load_bundle(args.bundle, require_calibration=False), torch.device("cpu")
    graphs = {spec.name: read_artefact(bundle, artefact_name(spec.name, "onnx"))[0] for spec in GRAPHS}
    fp32 = OnnxRuntimeBackend(graphs, cpu)
    with torch.inference_mode():
        feeds = calibration_feeds(bundle, fp32)
    ref = gate_reference(bundle, fp32)
    print(f"{torch.get_num_threads()} threads; gate levels: {ref.levels}")
    for spec in GRAPHS:
        int8 = quantise_graph(graphs[spec.name], feeds[spec.name])
        feed = {k: np.concatenate([f[k] for f in feeds[spec.name]])[:32] for k in spec.inputs}
        sessions = [ort.InferenceSession(g, session_options(), providers=["CPUExecutionProvider"])
                    for g in (graphs[spec.name], int8)]
        seconds = fastest(sessions, feed, args.repeats)
        candidate = OnnxRuntimeBackend({**graphs, spec.name: int8}, cpu, name=f"int8 {spec.name}")
        figures, problems = mask_figures(bundle, candidate, ref)
        masks = "; ".join(f"{level}: agreement {r['agreement']:.3%}, Dice {r['dice']:.4f}"
                          for level, r in figures.items())
        print(f"{spec.name}: fp32 {seconds[0]:.3f} s, int8 {seconds[1]:.3f} s ({seconds[0] / seconds[1]:.2f}x) on "
              f"{len(next(iter(feed.values())))} slices; {masks}; {'passes' if not problems else 'FAILS'}")


if __name__ == "__main__":
    main()
