"""Healthy training and validation slices, prepared once and held in memory.

Every volume is read and prepared exactly once (all its brain slices, with its brain mask), so an
epoch costs no file or preprocessing work. Batches are drawn by a permutation that depends only on
(seed, stage, epoch): the data order is reproducible and a resumed run replays the same epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import Tensor

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.errors import ConfigError
from phanes_cli.infra.progress import make_progress
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, select

HEALTHY = "healthy"


@dataclass(frozen=True)
class SliceSet:
    """Prepared slices of several volumes: images and brain masks (N, 1, S, S), source volume (N,)."""

    images: Tensor
    brain: Tensor
    volume: Tensor
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor) -> SliceSet:
        return SliceSet(self.images[index], self.brain[index], self.volume[index], self.ids)


def healthy_rows(manifest: Path, split: str) -> list[ManifestRow]:
    """Healthy rows of one split; a ConfigError names what the manifest lacks."""
    rows = read_manifest(manifest)
    chosen = select(rows, split=split, kind=HEALTHY)
    if not chosen:
        found = sorted({(r.split, r.kind) for r in rows})
        listing = ", ".join(f"{s}/{k}" for s, k in found) or "no rows at all"
        raise ConfigError(f"{manifest}: no healthy {split!r} volumes (rows with split={split!r} and kind={HEALTHY!r}); "
                          f"the manifest has split/kind: {listing}")
    return chosen


def load_slices(rows: Sequence[ManifestRow], cfg: PreprocessConfig, bar: Progress | None = None,
                description: str = "loading volumes", skull_strip: str = "auto", device: str = "cpu") -> SliceSet:
    """Read and prepare every volume once; brain masks come from the manifest or `inputs.brain_masks.brain_mask_for`."""
    images: list[Tensor] = []
    brains: list[Tensor] = []
    owners: list[Tensor] = []
    if bar is None:
        bar = make_progress(False)
    task = bar.add_task(description, total=len(rows), info="")
    for i, row in enumerate(rows):
        volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip, device=device)
        prepared = prepare_volume(volume.data, brain, cfg, volume.zooms)
        images.append(prepared.slices)
        brains.append(prepared.brain)
        owners.append(torch.full((prepared.slices.shape[0],), i, dtype=torch.int64))
        bar.update(task, advance=1, info=row.id)
    bar.update(task, info=f"{sum(t.shape[0] for t in images)} slices")
    size = cfg.image_size
    if not images or sum(t.shape[0] for t in images) == 0:
        return SliceSet(torch.zeros(0, 1, size, size), torch.zeros(0, 1, size, size), torch.zeros(0, dtype=torch.int64),
                        tuple(r.id for r in rows))
    return SliceSet(torch.cat(images), torch.cat(brains), torch.cat(owners), tuple(r.id for r in rows))


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int) -> list[Tensor]:
    """Index batches of one epoch: a seeded permutation, the incomplete tail dropped.

    Dropping the tail keeps every batch at full size (batch norm misbehaves on tiny batches); a set
    smaller than one batch is used whole.
    """
    generator = torch.Generator().manual_seed(hash_seed(seed, stage, epoch))
    order = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [order]
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for some types)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        mixed = int(part) + 0x9E3779B97F4A7C15 + ((value << 6) & 0xFFFFFFFFFFFFFFFF) + (value >> 2)
        value = (value ^ mixed) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def spread_subset(n: int, limit: int) -> Tensor:
    """At most `limit` indices spread evenly over range(n): a fixed, representative validation subset."""
    if n <= limit:
        return torch.arange(n)
    return torch.linspace(0, n - 1, limit).round().to(torch.int64).unique()
