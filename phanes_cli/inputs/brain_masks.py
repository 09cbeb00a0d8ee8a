"""Where a volume's brain mask comes from: a given file, a pretrained brain-extraction model, or a threshold.

The PHANES networks learn skull-stripped brains, and `preprocess.auto_brain_mask` (threshold + largest
component) only finds the brain when nothing else is in the image: on a head with skull and scalp it
returns the whole head, and scalp and skull are then scored as anomalies. So every volume's mask has a
source, recorded next to its results:

- `file`: the brain mask given with the volume (manifest column, BIDS `desc-brain_mask`), always preferred;
- `model`: deepbet (Fisch et al. 2024, MIT licence), a pretrained 3D U-Net whose TorchScript weights ship
  inside its PyPI wheel, so nothing is downloaded at run time; ~45 s per 1 mm head on one loaded CPU core
  pair, a second or two on a GPU;
- `threshold`: `auto_brain_mask`, right for skull-stripped input (zero background).

`--skull-strip auto` (the default) runs the model only when the threshold mask looks like a head:
`quality.skull_present` (tissue in a shell outside the mask, or a skull/CSF layer under its surface) on the
~3 mm check grid, about half a second per volume. `always` runs the model on every volume without a mask
file; `never` trusts the threshold mask (the behaviour before skull stripping existed).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from phanes_cli.core.preprocess import auto_brain_mask
from phanes_cli.core.volume_io import DEFAULT_MAX_VOXELS, Volume, load_mask, load_volume, save_like
from phanes_cli.errors import ConfigError, InputError, QualityError
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.inputs.quality import FATAL, FLAGS, GRID_MM, check_volume, skull_present

SKULL_STRIP_MODES = ("auto", "always", "never")
MODEL_THRESHOLD = 0.5  # deepbet's own default cut on its brain probability


def check_mode(mode: str) -> str:
    """The mode itself, or a ConfigError naming the allowed values."""
    if mode not in SKULL_STRIP_MODES:
        raise ConfigError(f"--skull-strip {mode!r} is not one of {', '.join(SKULL_STRIP_MODES)}")
    return mode


def looks_unstripped(volume: Volume, brain: np.ndarray) -> bool:
    """True when skull or scalp lie around (or inside) `brain`: the `quality` skull check on the ~3 mm grid."""
    zooms = np.asarray(volume.zooms, dtype=np.float64)
    step = np.maximum(1, np.floor(GRID_MM / zooms)).astype(int)
    grid = tuple(slice(None, None, int(s)) for s in step)
    return bool(np.any(brain)) and skull_present(volume.data[grid], np.asarray(brain, dtype=bool)[grid], zooms * step)


@functools.lru_cache(maxsize=2)
def _extractor(device: str) -> Any:
    """deepbet's two TorchScript networks, loaded once per process and device (imported here: it is heavy)."""
    import torch
    from deepbet import BrainExtraction

    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: deepbet ships TorchScript files
        warnings.simplefilter("ignore", FutureWarning)
        model = BrainExtraction(no_gpu=True)  # loads on the CPU; moved to the requested device below
    model.model.to(torch.device(device))
    model.bbox_model.to(torch.device(device))
    return model


def model_brain_mask(volume: Volume, device: str = "cpu") -> np.ndarray:
    """deepbet's brain mask of a RAS+ volume: bool, same grid; an InputError when it finds no brain."""
    extractor = _extractor(device)
    data = np.nan_to_num(np.asarray(volume.data, dtype=np.float32))
    try:
        probability = extractor.run_model(data.copy())
        mask = extractor.postprocess(probability > MODEL_THRESHOLD)
    except (AssertionError, ValueError) as exc:  # deepbet asserts when its locator sees no head at all
        raise InputError(volume.path, f"brain extraction found no brain ({exc or 'no foreground'})") from exc
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError(volume.path, "brain extraction found no brain")
    return mask


def brain_mask_for(volume: Volume, brain_mask: str | Path | None, mode: str, device: str = "cpu",
                   max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, str]:
    """(bool brain mask on the volume's RAS+ grid, its source: file, model or threshold) under `mode`."""
    if brain_mask is not None:
        return load_mask(brain_mask, volume, max_voxels), "file"
    if check_mode(mode) == "always":
        return model_brain_mask(volume, device), "model"
    threshold = auto_brain_mask(volume.data)
    if mode == "auto" and looks_unstripped(volume, threshold):
        return model_brain_mask(volume, device), "model"
    return threshold, "threshold"


def load_with_brain(image: str | Path, brain_mask: str | Path | None, max_voxels: int = DEFAULT_MAX_VOXELS,
                    skull_strip: str = "auto", device: str = "cpu", timings: dict[str, float] | None = None
                    ) -> tuple[Volume, np.ndarray, str]:
    """Read a volume and its brain mask: (Volume, bool brain, mask source "file" | "model" | "threshold").

    The given mask file on the same grid, else `brain_mask_for` under `skull_strip`
    (auto | always | never): a brain-extraction model on heads with skull, `auto_brain_mask` otherwise.
    `timings`, when given, receives the seconds spent on the mask as "brain_mask_s" (screening's timing column).
    """
    volume = load_volume(image, max_voxels)
    start = time.perf_counter()
    brain, source = brain_mask_for(volume, brain_mask, skull_strip, device, max_voxels)
    if timings is not None:
        timings["brain_mask_s"] = time.perf_counter() - start
    return volume, brain, source


@dataclass(frozen=True)
class CheckedVolume:
    """A volume ready to screen: read, with its brain mask, past the fatal quality checks."""

    volume: Volume
    brain: np.ndarray  # bool on the RAS+ grid
    source: str  # where the brain mask came from: file, model or threshold
    qc_flags: tuple[str, ...]  # quality warnings (`quality.check_volume`); the volume is screened anyway


def load_checked(image: str | Path, brain_mask: str | Path | None, max_voxels: int = DEFAULT_MAX_VOXELS,
                 skull_strip: str = "auto", device: str = "cpu", timings: dict[str, float] | None = None
                 ) -> CheckedVolume:
    """`load_with_brain`, then the quality check: a QualityError naming `image` when a fatal flag leaves
    nothing to screen (a property of the file, not retried while it is unchanged)."""
    volume, brain, source = load_with_brain(image, brain_mask, max_voxels, skull_strip, device, timings)
    flags = tuple(check_volume(volume, brain, source))
    fatal = [f for f in flags if f in FATAL]
    if fatal:
        raise QualityError(image, f"quality check {fatal[0]}: {FLAGS[fatal[0]]}")
    return CheckedVolume(volume, brain, source, flags)


def add_model_masks(rows: list[ManifestRow], folder: Path, mode: str, device: str = "cpu",
                    progress: Callable[[str], None] | None = None) -> tuple[list[ManifestRow], Counter[str]]:
    """`data prepare`: strip once, reuse everywhere. Rows without a brain mask whose brain needs the model
    get `<folder>/<id>_brainmask.nii.gz` (the model's mask) as their brain_mask, so training, calibration,
    evaluation and screening read it as a file instead of running the model again. Every row gets a
    `brain_mask_source` column: file (given), model or threshold.

    Returns the rows (same order) and how many volumes have each mask source.
    """
    counts: Counter[str] = Counter()
    out = []
    for row in rows:
        source = "file" if row.brain_mask is not None else "threshold"
        if row.brain_mask is None and check_mode(mode) != "never":
            volume = load_volume(row.image)
            brain, source = brain_mask_for(volume, None, mode, device)
            if source == "model":
                path = save_like(brain.astype(np.uint8), volume, Path(folder) / f"{row.id}_brainmask.nii.gz", np.uint8)
                row = replace(row, brain_mask=path)
        row = replace(row, extra={**row.extra, "brain_mask_source": source})
        counts[source] += 1
        out.append(row)
        if progress is not None:
            progress(f"{row.id}: {source}")
    return out, counts
