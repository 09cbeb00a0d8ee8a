"""The three inference graphs every runtime executes, as torch modules with tensor-only signatures.

Export traces exactly these, and the ONNX Runtime and TensorRT backends bind their input and output
names, so the graph a runtime runs and the one the parity check compares are the same by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from phanes_cli.runtimes.pytorch import PhanesNetworks


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its file stem under engines/, input names (each (N,1,S,S) float32) and output name."""

    name: str
    inputs: tuple[str, ...]
    output: str


STAGE1 = GraphSpec("stage1", ("x",), "x_cph")
STAGE2 = GraphSpec("stage2", ("masked", "mask"), "completed")
LPIPS = GraphSpec("lpips", ("a", "b"), "lpips_map")
GRAPHS: tuple[GraphSpec, ...] = (STAGE1, STAGE2, LPIPS)


def numpy_feed(spec: GraphSpec, tensors: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    """A graph's named float32 CPU inputs, contiguous, as the ONNX Runtime and OpenVINO sessions take them."""
    return {name: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
            for name, t in zip(spec.inputs, tensors, strict=True)}


class GraphBackend:
    """The network calls of a backend that runs the exported graphs: each is one `_run` of its graph."""

    def _run(self, spec: GraphSpec, *tensors: Tensor) -> Tensor:
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._run(STAGE1, x)

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self._run(STAGE2, masked, mask)

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        return self._run(LPIPS, a, b)


class Stage1Graph(nn.Module):
    """x -> x_cph = D(mu(E(x))): the posterior mean is decoded, so the graph is deterministic."""

    def __init__(self, networks: PhanesNetworks) -> None:
        super().__init__()
        self.ra = networks.ra

    def forward(self, x: Tensor) -> Tensor:
        return self.ra.reconstruct(x)


class Stage2Graph(nn.Module):
    """(x * (1 - m) + m, m) -> G(...): the raw generator output; blending with x stays in the pipeline."""

    def __init__(self, networks: PhanesNetworks) -> None:
        super().__init__()
        self.generator = networks.generator

    def forward(self, masked: Tensor, mask: Tensor) -> Tensor:
        return self.generator(masked, mask)


class LPIPSGraph(nn.Module):
    """(a, b) -> spatial LPIPS map: AlexNet trunk, unit-normalised feature differences, linear heads, upsampling."""

    def __init__(self, networks: PhanesNetworks) -> None:
        super().__init__()
        self.lpips = networks.lpips

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.lpips(a, b)


def graph_modules(networks: PhanesNetworks) -> dict[str, nn.Module]:
    """Every graph of one model, keyed by GraphSpec.name, in eval mode."""
    return {STAGE1.name: Stage1Graph(networks).eval(), STAGE2.name: Stage2Graph(networks).eval(),
            LPIPS.name: LPIPSGraph(networks).eval()}
