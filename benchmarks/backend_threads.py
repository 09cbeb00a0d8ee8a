"""Each CPU backend's slices/s at several thread counts, in one process, interleaved (docs/performance.md).

`phanes bench` runs with as many threads as cores, while `phanes screen` on a small machine runs one-thread
actors: a backend's speed-up at one thread is not its speed-up at two. This times the whole slice pipeline
(`runtimes.timing.measure`) of every usable CPU backend at each thread count, the thread counts and the
backends taking turns round after round, so a busy machine slows every figure alike.

Usage: python benchmarks/backend_threads.py BUNDLE [--threads 1 2] [--slices 16] [--rounds 3]
(BUNDLE with ONNX graphs: the shipped model's first-use copy in the user cache, or `phanes export --bundle B`)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from phanes_cli.core.bundle import load_bundle
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices
from phanes_cli.runtimes.select import CPU_BACKENDS, build_backend, unusable_reason
from phanes_cli.runtimes.timing import measure

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    usable = [name for name in CPU_BACKENDS if unusable_reason(name, bundle, CPU) is None]
    x, brain = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS[:1], args.slices)
    built = {}
    for threads in args.threads:  # sessions are built with the thread count they run at, as in an actor
        torch.set_num_threads(threads)
        built[threads] = {name: build_backend(name, bundle, CPU) for name in usable}
    level = reference_mask_threshold(bundle, built[args.threads[0]]["torch"], x[:8], brain[:8])
    speeds: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, r in measure(built[threads], bundle, level, x, brain, args.batch_size, 1).items():
                speeds.setdefault((threads, name), []).append(r["slices_per_s"])
    print(f"{'backend':<18}" + "".join(f"{f'{t} thread(s)':>14}{'vs torch':>10}" for t in args.threads))
    for name in usable:
        row = f"{name:<18}"
        for threads in args.threads:
            value = statistics.median(speeds[threads, name])
            row += f"{value:>14.2f}{value / statistics.median(speeds[threads, 'torch']):>9.2f}x"
        print(row)
    print(f"median of {args.rounds} interleaved rounds, {args.slices} slices, batch {args.batch_size}")


if __name__ == "__main__":
    main()
