"""Static QC figures (PNG, for PDFs and e-mails) with the viewer's conventions.

Three rows, axial, coronal and sagittal, each through the largest lesion first, then the slices with
the most lesion voxels, then slices spread over where the brain is (quantiles of the brain's extent, so
no near-empty edge slice is chosen). Grey: the input; heat: the anomaly map s(x) with its colour bar;
cyan outline: lesion mask; yellow outline: the brain; magenta outline: the ground truth when known.
Neurological convention (the subject's right on the right of axial and coronal tiles), each tile
lettered L/R (or P/A), voxels drawn square in mm. Pillow only: no plotting library is needed.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from phanes_cli.cohort_report.cases import CaseArrays
from phanes_cli.infra.atomic import write_bytes

LESION_RGB = np.array([0, 230, 255], dtype=np.float32)
BRAIN_RGB = np.array([255, 220, 0], dtype=np.float32)
TRUTH_RGB = np.array([255, 60, 220], dtype=np.float32)
TILE_MM_PX = 230  # the largest field of view is drawn this many pixels wide
PLANES = (("axial", 2, ("L", "R")), ("coronal", 1, ("L", "R")), ("sagittal", 0, ("P", "A")))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def pick_slices(brain: np.ndarray, lesion: np.ndarray, axis: int, count: int, centre: int) -> list[int]:
    """`count` indices along `axis`: the centre, then the most lesioned slices, then spread over the brain."""
    others = tuple(a for a in range(3) if a != axis)
    per_slice = lesion.sum(axis=others)
    brain_profile = brain.sum(axis=others).astype(float)
    chosen = [centre]
    apart = max(3, int(np.count_nonzero(brain_profile)) // (3 * count))  # lesion slices this far from each other
    for z in np.argsort(-per_slice, kind="stable"):
        if len(chosen) >= (count + 1) // 2 or per_slice[z] == 0:
            break
        if all(abs(int(z) - c) >= apart for c in chosen):
            chosen.append(int(z))
    if brain_profile.sum() > 0:
        cdf = np.cumsum(brain_profile) / brain_profile.sum()
        spread = [int(np.searchsorted(cdf, q)) for q in np.linspace(0.12, 0.88, count)]
    else:
        spread = np.linspace(0, lesion.shape[axis] - 1, count).round().astype(int).tolist()
    for z in sorted(spread, key=lambda s: -min(abs(s - c) for c in chosen)):
        if len(chosen) < count and all(abs(z - c) > 1 for c in chosen):
            chosen.append(z)
    for z in spread:  # a thin brain: neighbours are better than fewer tiles
        if len(chosen) < count and z not in chosen:
            chosen.append(z)
    return sorted(set(chosen))


def _heat(values: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp ('hot'), values in [0, 1] -> RGB in [0, 255]."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1) * 255.0


def _edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _plane(arrays: CaseArrays, axis: int, index: int, window: float, heat_max: float) -> np.ndarray:
    """One slice as RGB, in the array's (first, second) remaining axes."""
    take = [slice(None)] * 3
    take[axis] = slice(index, index + 1)

    def cut(volume: np.ndarray) -> np.ndarray:
        return np.squeeze(volume[tuple(take)], axis=axis)

    grey = np.clip(cut(arrays.image) / max(window, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    score = cut(arrays.anomaly) / heat_max if heat_max > 0 else np.zeros_like(grey)
    alpha = np.clip(score * 1.5, 0, 0.85)[..., None]
    rgb = rgb * (1 - alpha) + _heat(score) * alpha
    rgb[_edge(cut(arrays.brain))] = BRAIN_RGB
    if arrays.truth is not None:
        rgb[_edge(cut(arrays.truth))] = TRUTH_RGB
    rgb[_edge(cut(arrays.lesion))] = LESION_RGB
    return rgb


def _tile(arrays: CaseArrays, axis: int, index: int, window: float, heat_max: float, letters: tuple[str, str]
          ) -> Image.Image:
    """The slice turned for display (superior or anterior up), voxels made square at a common mm scale."""
    rgb = np.rot90(_plane(arrays, axis, index, window, heat_max), k=1)
    across, up = (a for a in range(3) if a != axis)
    mm_px = TILE_MM_PX / max(s * z for s, z in zip(arrays.image.shape, arrays.zooms, strict=True))
    size = (max(1, round(rgb.shape[1] * arrays.zooms[across] * mm_px)),
            max(1, round(rgb.shape[0] * arrays.zooms[up] * mm_px)))
    tile = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(tile)
    font = _font(14)
    middle = tile.height // 2 - 8
    draw.text((3, middle), letters[0], fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    draw.text((tile.width - 12, middle), letters[1], fill=(255, 255, 255), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    return tile


def _colour_bar(width: int, heat_max: float) -> Image.Image:
    bar = Image.new("RGB", (width, 44), (20, 20, 20))
    ramp = _heat(np.linspace(0, 1, 256))[None].repeat(12, axis=0).clip(0, 255).astype(np.uint8)
    length = min(256 * 2, width - 180)
    bar.paste(Image.fromarray(ramp).resize((length, 12)), (60, 6))
    draw, font = ImageDraw.Draw(bar), _font(12)
    draw.text((60, 22), "0", fill=(230, 230, 230), font=font)
    draw.text((60 + length - 30, 22), f"{heat_max:.3g}", fill=(230, 230, 230), font=font)
    draw.text((66 + length, 4), "anomaly score s(x)", fill=(230, 230, 230), font=font)
    return bar


def render_case(arrays: CaseArrays, title: str, per_plane: int = 4) -> Image.Image:
    """The QC figure of one volume: one row per plane, a legend and the colour bar of s(x)."""
    brain_values = arrays.image[arrays.brain]
    window = float(np.percentile(brain_values, 99.5)) if brain_values.size else 1.0
    positive = arrays.anomaly[arrays.brain & (arrays.anomaly > 0)]
    heat_max = float(np.percentile(positive, 99.5)) if positive.size else 0.0
    rows = []
    for name, axis, letters in PLANES:
        chosen = pick_slices(arrays.brain, arrays.lesion, axis, per_plane, arrays.centre[axis])
        tiles = [_tile(arrays, axis, z, window, heat_max, letters) for z in chosen]
        rows.append((f"{name} {'xyz'[axis]} = {', '.join(map(str, chosen))}", tiles))
    if arrays.pseudo_healthy is not None:
        blank = np.zeros_like(arrays.lesion)
        plain = replace(arrays, image=arrays.pseudo_healthy, anomaly=np.zeros_like(arrays.anomaly), lesion=blank,
                        truth=None)
        chosen = pick_slices(arrays.brain, arrays.lesion, 2, per_plane, arrays.centre[2])
        rows.append(("pseudo-healthy image, axial", [_tile(plain, 2, z, window, 0.0, ("L", "R")) for z in chosen]))
    width = max(560, max(sum(t.width + 4 for t in tiles) for _, tiles in rows))
    height = 30 + sum(20 + max(t.height for t in tiles) for _, tiles in rows) + 64
    canvas = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill=(240, 240, 240), font=_font(15))
    y = 30
    for label, tiles in rows:
        draw.text((6, y + 2), label, fill=(200, 200, 200), font=_font(12))
        x, y = 0, y + 20
        for tile in tiles:
            canvas.paste(tile, (x, y))
            x += tile.width + 4
        y += max(t.height for t in tiles)
    legend = f"cyan: lesion mask   yellow: brain ({arrays.brain_source})" + (
        "   magenta: ground truth" if arrays.truth is not None else "")
    draw.text((6, y + 2), legend + "   neurological view, RAS+", fill=(200, 200, 200), font=_font(12))
    canvas.paste(_colour_bar(width, heat_max), (0, y + 20))
    return canvas


def png_base64(image: Image.Image) -> str:
    """The image as PNG in base64, for data: URLs and for the file (encoded once, both use the same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def save_png(encoded: str, target: Path) -> Path:
    """Write a `png_base64` PNG atomically (a killed report never leaves half a picture)."""
    return write_bytes(target, base64.b64decode(encoded))
