"""The interface between the pipeline and the networks: a backend runs the three PHANES networks on slices.

The pipeline only talks to this protocol, so the torch, ONNX Runtime and TensorRT backends of
`phanes_cli.runtimes` replace one another without touching the data flow.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Backend(Protocol):
    """Executes the networks; every tensor is (N, 1, S, S) float32 in [0, 1] on `device`."""

    name: str
    device: torch.device

    def reconstruct(self, x: Tensor) -> Tensor:
        """Stage 1: x_cph = D(mu(E(x)))."""

    def inpaint(self, masked: Tensor, mask: Tensor) -> Tensor:
        """Stage 2: G(x * (1 - m) + m, m)."""

    def lpips(self, a: Tensor, b: Tensor) -> Tensor:
        """Spatial LPIPS map of two grey images."""
