"""INT8 static quantisation of the exported ONNX graphs (ONNX Runtime's QDQ tooling) for the `onnxruntime-int8`
backend.

Activation ranges are calibrated on what a graph really receives: the fp32 graphs run the whole pipeline on
real healthy brain slices shipped with phanes (`samples.CALIBRATION_BRAINS`, disjoint from the brains the
export gate judges on), and every input of every call is recorded. Convolutions are quantised (weights
int8 per channel, activations uint8 per tensor); everything else stays fp32. Weights use 7 bits
(`reduce_range`): x86 CPUs without VNNI multiply u8 x s8 pairs into 16-bit sums that full 8-bit weights
saturate (on this project's AVX2 machine, LPIPS quantised with 8-bit weights gave lesion masks with Dice
0.13 against fp32; with 7 bits 0.89), and a graph gated on one machine must hold on the others.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime import quantization
from torch import Tensor

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.core.pipeline import run_slices
from phanes_cli.runtimes.graphs import LPIPS, STAGE1, STAGE2, GraphSpec
from phanes_cli.runtimes.parity import reference_mask_threshold
from phanes_cli.runtimes.samples import CALIBRATION_BRAINS, shipped_brain_slices

# Graphs quantised (benchmarks/reduced_graphs.py, docs/backends.md; cpu config, 2 threads): only the
# generator, 1.5x faster alone. LPIPS, as fast a gain, moved the lesion masks on real brains to Dice 0.90
# against fp32 (0.93 to 0.98 with any single layer pair quantised), stage 1 to 0.77 for no speed: both fail the
# export gate, so they stay fp32.
INT8_GRAPHS: tuple[str, ...] = (STAGE2.name,)
CALIBRATION_SLICES_PER_BRAIN = 8
QUANTISED_OPS = ["Conv"]
Feeds = dict[str, list[dict[str, np.ndarray]]]


class RecordingBackend:
    """Runs an fp32 backend and keeps every input it was given, per graph: the calibration data."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.feeds: Feeds = {STAGE1.name: [], STAGE2.name: [], LPIPS.name: []}

    def _record(self, spec: GraphSpec, call: Callable[..., Tensor], *args: Tensor) -> Tensor:
        inputs = zip(spec.inputs, args, strict=True)
        self.feeds[spec.name].append({name: t.detach().cpu().numpy().copy() for name, t in inputs})
        return call(*args)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._record(STAGE1, self.inner.reconstruct, x)

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self._record(STAGE2, self.inner.inpaint, masked, mask)

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self._record(LPIPS, self.inner.lpips, a, b)


def calibration_feeds(bundle: Bundle, reference: Backend, batch_size: int = 8) -> Feeds:
    """Every graph input of the fp32 pipeline (at the bundle's mask threshold) over the calibration slices."""
    x, brain = shipped_brain_slices(bundle.config.preprocess, CALIBRATION_BRAINS, CALIBRATION_SLICES_PER_BRAIN)
    level = reference_mask_threshold(bundle, reference, x, brain)
    recorder = RecordingBackend(reference)
    for i in range(0, x.shape[0], batch_size):
        run_slices(x[i:i + batch_size], brain[i:i + batch_size], recorder, bundle.config, level)
    return recorder.feeds


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantise_graph(graph: bytes, feeds: list[dict[str, np.ndarray]]) -> bytes:
    """The QDQ INT8 version of one fp32 ONNX graph, activation ranges from `feeds` (min/max)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tooling's advice to pre-process, which the line below does
        source, prepared, out = (Path(tmp) / f"{stem}.onnx" for stem in ("fp32", "prepared", "int8"))
        source.write_bytes(graph)
        quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(str(prepared), str(out), _Reader(feeds), quant_format=quantization.QuantFormat.QDQ,
                                     op_types_to_quantize=QUANTISED_OPS, per_channel=True, reduce_range=True,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     calibrate_method=quantization.CalibrationMethod.MinMax)
        return out.read_bytes()


def quantise(graphs: dict[str, bytes], bundle: Bundle, reference: Backend) -> tuple[dict[str, bytes], dict[str, Any]]:
    """INT8 graphs of INT8_GRAPHS, calibrated on `reference` (an fp32 backend), and how (for the provenance)."""
    with torch.inference_mode():
        feeds = calibration_feeds(bundle, reference)
    quantised = {name: quantise_graph(graphs[name], feeds[name]) for name in INT8_GRAPHS}
    info = {"format": "QDQ", "weights": "int8 per channel, 7-bit range", "activations": "uint8 per tensor",
            "calibration": f"min/max over the fp32 pipeline on {CALIBRATION_SLICES_PER_BRAIN} slices each of "
                           f"{', '.join(CALIBRATION_BRAINS)}", "ops": QUANTISED_OPS,
            "calls": {name: len(feeds[name]) for name in INT8_GRAPHS}}
    return quantised, info
