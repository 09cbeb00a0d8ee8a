"""QC figures: a mosaic of axial slices per volume, the way a reader checks a case at a glance.

Each tile shows the input slice in grey with the anomaly map s(x) as a heat map on top and the lesion
mask outlined in cyan; when a pseudo-healthy image was written, the same slices of it stand beside.
Arrays are on the RAS+ grid, drawn in neurological convention (the subject's right on the right of
the tile), anterior at the top. Pillow only: no plotting library is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from phanes_cli.infra.atomic import atomic_path

OUTLINE_RGB = np.array([0, 230, 255], dtype=np.float32)
MIN_TILE_PX = 160


@dataclass(frozen=True)
class CaseArrays:
    """One volume's arrays on its RAS+ grid, (X, Y, Z) each."""

    image: np.ndarray
    anomaly: np.ndarray
    lesion: np.ndarray  # bool
    pseudo_healthy: np.ndarray | None


def pick_slices(image: np.ndarray, lesion: np.ndarray, count: int) -> list[int]:
    """`count` axial indices evenly over the image's extent, each lesion's largest slice included first."""
    occupied = np.flatnonzero(np.abs(image).reshape(-1, image.shape[2]).max(axis=0) > 0)
    if occupied.size == 0:
        return [image.shape[2] // 2]
    even = np.linspace(occupied[0], occupied[-1], num=min(count, occupied.size)).round().astype(int).tolist()
    per_slice = lesion.reshape(-1, lesion.shape[2]).sum(axis=0)
    with_lesion = [int(z) for z in np.argsort(-per_slice) if per_slice[z] > 0][: count // 2]
    chosen = sorted(set(with_lesion))
    for z in even:
        if len(chosen) >= count:
            break
        if all(abs(z - c) > 1 for c in chosen):
            chosen.append(z)
    return sorted(chosen)


def _grey(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(scaled[..., None] * 255.0, 3, axis=-1)


def _heat(values: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp ('hot'), values in [0, 1] -> RGB in [0, 255]."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1) * 255.0


def _tile(arrays: CaseArrays, z: int, window: tuple[float, float], heat_max: float) -> np.ndarray:
    """One axial slice as RGB (rows = anterior to posterior, columns = left to right of the array)."""
    rgb = _grey(arrays.image[:, :, z], *window)
    anomaly = arrays.anomaly[:, :, z] / heat_max if heat_max > 0 else np.zeros_like(arrays.anomaly[:, :, z])
    alpha = np.clip(anomaly * 1.5, 0, 0.85)[..., None]
    rgb = rgb * (1 - alpha) + _heat(anomaly) * alpha
    mask = arrays.lesion[:, :, z]
    edge = mask & ~ndimage.binary_erosion(mask)
    rgb[edge] = OUTLINE_RGB
    return np.rot90(rgb, k=1)  # (x, y) -> rows from anterior (top) to posterior, columns left to right


def _mosaic(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    rows = -(-len(tiles) // columns)
    h, w = tiles[0].shape[:2]
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return canvas


def render_case(arrays: CaseArrays, title: str, count: int = 12, columns: int = 4) -> Image.Image:
    """The QC figure of one volume: the annotated mosaic, and the pseudo-healthy mosaic beside it."""
    slices = pick_slices(arrays.image, arrays.lesion, count)
    brain_values = arrays.image[arrays.image > 0]
    window = (0.0, float(np.percentile(brain_values, 99.5))) if brain_values.size else (0.0, 1.0)
    positive = arrays.anomaly[arrays.anomaly > 0]
    heat_max = float(np.percentile(positive, 99.5)) if positive.size else 0.0
    panels = [_mosaic([_tile(arrays, z, window, heat_max) for z in slices], columns)]
    if arrays.pseudo_healthy is not None:
        panels.append(_mosaic([np.rot90(_grey(arrays.pseudo_healthy[:, :, z], *window), k=1) for z in slices], columns))
    gap = np.full((panels[0].shape[0], 2, 3), 40.0, dtype=np.float32)
    body = np.concatenate([p if i == 0 else np.concatenate([gap, p], axis=1) for i, p in enumerate(panels)], axis=1)
    picture = Image.fromarray(body.clip(0, 255).astype(np.uint8))
    zoom = max(1, -(-MIN_TILE_PX // arrays.image.shape[1]))  # small or coarse volumes are enlarged, voxels kept square
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    image = Image.new("RGB", (max(picture.width, 560), picture.height + 22), (20, 20, 20))
    image.paste(picture, (0, 22))
    caption = f"{title}   axial slices {slices[0]}..{slices[-1]} (RAS+), anterior up"
    if arrays.pseudo_healthy is not None:
        caption += "   | right: pseudo-healthy"
    ImageDraw.Draw(image).text((6, 5), caption, fill=(230, 230, 230))
    return image


def save_png(image: Image.Image, target: Path) -> Path:
    """Write a PNG atomically (a killed report never leaves half a picture)."""
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return target
