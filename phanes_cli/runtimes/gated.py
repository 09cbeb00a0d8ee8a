"""The cheaper CPU backends built and judged at `phanes export`: `onnxruntime-int8` (INT8 graphs from
`runtimes.quantise`), `openvino` (the fp32 graphs compiled by OpenVINO) and `openvino-bf16` (the same with the
generator in bf16; gated only on a CPU with native bf16, the only kind that will run it).

Each candidate runs `parity.gate` against fp32 (torch for the parity figures, the fp32 ONNX graphs for the
lesion masks on real brains). The verdict, passed or not, with its figures and the runtime version it was
measured with, goes into the provenance under `gates`; only a passing candidate's artefacts are written. At
load `artefacts.read_gate` refuses a backend that failed (with the figure) or was gated with another runtime
version, so none of them is ever used unjudged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch

from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import Bundle
from phanes_cli.errors import ConfigError
from phanes_cli.infra.optional import available, missing_message
from phanes_cli.infra.versions import package_version
from phanes_cli.runtimes import BF16_BACKEND, GATED_BACKENDS
from phanes_cli.runtimes.artefacts import artefact_name
from phanes_cli.runtimes.onnx import INT8_BACKEND, OnnxRuntimeBackend
from phanes_cli.runtimes.parity import ParitySet, gate, gate_reference
from phanes_cli.runtimes.quantise import quantise

CPU = torch.device("cpu")
RUNTIME_PACKAGE = {INT8_BACKEND: "onnxruntime", "openvino": "openvino", BF16_BACKEND: "openvino"}
PRECISION = {INT8_BACKEND: "int8", "openvino": "fp32", BF16_BACKEND: "bf16"}
# A candidate: (its backend, the artefacts it adds, what the provenance records about it)
Candidate = tuple[Backend, dict[str, bytes], dict[str, Any]]


@dataclass
class Gated:
    """What gating wrote and recorded: artefacts of the passing candidates, every verdict, why each named candidate
    that could not be built here was not gated (`not_gated`, also as printable `notes`)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    entries: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    not_gated: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _int8(bundle: Bundle, graphs: dict[str, bytes]) -> Candidate:
    """INT8 graphs calibrated through fp32 ONNX Runtime (equal to torch within the export parity)."""
    quantised, info = quantise(graphs, bundle, OnnxRuntimeBackend(graphs, CPU))
    files = {name: artefact_name(name, "onnx", "int8" if name in quantised else "fp32") for name in graphs}
    backend = OnnxRuntimeBackend({**graphs, **quantised}, CPU, name=INT8_BACKEND)
    return backend, {files[name]: data for name, data in quantised.items()}, {"graphs": files, "quantisation": info}


def _openvino(bundle: Bundle, graphs: dict[str, bytes]) -> Candidate:
    from phanes_cli.runtimes.openvino import OpenVINOBackend  # the [openvino] extra, checked installed

    return OpenVINOBackend(graphs, CPU), {}, {"graphs": {name: artefact_name(name, "onnx") for name in graphs}}


def _openvino_bf16(bundle: Bundle, graphs: dict[str, bytes]) -> Candidate:
    from phanes_cli.runtimes.openvino import BF16_GRAPHS, OpenVINOBackend

    info = {"graphs": {name: artefact_name(name, "onnx") for name in graphs}, "bf16_graphs": list(BF16_GRAPHS)}
    return OpenVINOBackend(graphs, CPU, bf16_graphs=BF16_GRAPHS), {}, info


CANDIDATES: dict[str, Callable[[Bundle, dict[str, bytes]], Candidate]] = {
    INT8_BACKEND: _int8, "openvino": _openvino, BF16_BACKEND: _openvino_bf16}


def validate_gated(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in GATED_BACKENDS]
    if unknown:
        raise ConfigError(f"unknown CPU backend {', '.join(unknown)}; choose from: {', '.join(GATED_BACKENDS)}")
    return names


def _not_here(name: str) -> str | None:
    """Why candidate `name` cannot be built on this machine (runtime missing, no native bf16), or None."""
    if not available(RUNTIME_PACKAGE[name]):
        return missing_message(RUNTIME_PACKAGE[name], f"the {name} backend")
    if name == BF16_BACKEND:
        from phanes_cli.runtimes.openvino import native_bf16

        if not native_bf16():
            return "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX)"
    return None


def _opset(graph: bytes) -> int:
    return max(o.version for o in onnx.load_from_string(graph).opset_import if o.domain in ("", "ai.onnx"))


def _entries(blobs: dict[str, bytes], files: dict[str, str]) -> dict[str, Any]:
    """Provenance entries of the INT8 graphs (the written files of a passing `onnxruntime-int8`)."""
    graph_of = {file: graph for graph, file in files.items()}
    return {name: {"graph": graph_of[name], "format": "onnx", "precision": "int8", "opset": _opset(data)}
            for name, data in blobs.items()}


def gate_backends(bundle: Bundle, graphs: dict[str, bytes], sets: list[ParitySet], names: list[str]) -> Gated:
    """Build each named candidate from the fp32 graphs, judge it against fp32 (torch's parity `sets` on the CPU),
    keep what passes."""
    out = Gated()
    reasons = {n: _not_here(n) for n in validate_gated(names)}
    installed = [n for n in names if reasons[n] is None]
    out.not_gated = {n: reason for n, reason in reasons.items() if reason is not None}
    out.notes += [f"{n} not gated: {reason}" for n, reason in out.not_gated.items()]
    if not installed:
        return out
    # fp32 masks from fp32 ONNX Runtime: the export's parity check has just matched it to torch within 1e-4
    ref = gate_reference(bundle, OnnxRuntimeBackend(graphs, CPU))
    for name in installed:
        backend, blobs, info = CANDIDATES[name](bundle, graphs)
        verdict = gate(bundle, backend, sets, ref, PRECISION[name])
        out.gates[name] = {**verdict, "runtime_version": package_version(RUNTIME_PACKAGE[name]), **info}
        if verdict["passed"]:
            out.blobs.update(blobs)
            out.entries.update(_entries(blobs, info["graphs"]))
    return out
