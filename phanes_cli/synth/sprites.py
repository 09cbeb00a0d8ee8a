"""The paper's synthetic anomalies ("sprites"): filled ellipses of tissue-like or extreme intensity.

Protocol (method.md, Table 1): per axial slice, `count` filled ellipses; each takes one intensity drawn
uniformly between a randomly chosen pair of the slice's percentiles (1, 5), (30, 70) or (95, 99);
centres lie in the central half of the image and inside the brain; semi-axes are |N(4, 6)| pixels,
at least 2, in 128-pixel units (scaled by `scale` native pixels per unit); orientation is uniform.
Percentiles are taken over the slice's brain pixels: with the background included, the low band
would be pure background (0) rather than dark tissue. Masks are the ellipses restricted to the brain.

3D sprite subjects (`sprite_volume`) paint every axial slice of a band covering the central 40% of
the brain's axial extent with independent 2D sprites: exactly the per-slice protocol the model and
the Table 1 evaluation see, so a volume's ground truth is the union of per-slice ellipses.
"""

from __future__ import annotations

import numpy as np

PERCENTILE_BANDS: tuple[tuple[float, float], ...] = ((1.0, 5.0), (30.0, 70.0), (95.0, 99.0))
REFERENCE_SIZE = 128  # pixel units of the protocol's semi-axes
CENTRE_TRIES = 50
BAND_FRACTION = 0.4


def ellipse(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
    """Filled ellipse (H, W) bool; `axes` are the semi-axes (rows, cols) before rotation by `angle` rad."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dy, dx = rows - centre[0], cols - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u = c * dy + s * dx
    v = -s * dy + c * dx
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0


def _centre(brain: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A centre in the central half of the image, inside the brain when one is found there."""
    h, w = brain.shape
    for _ in range(CENTRE_TRIES):
        cy, cx = rng.uniform(h / 4, 3 * h / 4), rng.uniform(w / 4, 3 * w / 4)
        if brain[int(cy), int(cx)]:
            return cy, cx
    inner = np.argwhere(brain[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4])
    if len(inner):
        cy, cx = inner[rng.integers(len(inner))] + (h // 4, w // 4)
        return float(cy), float(cx)
    return rng.uniform(h / 4, 3 * h / 4), rng.uniform(w / 4, 3 * w / 4)


def paint_slice(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator, count: int,
                scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint `count` ellipses on one slice (H, W), any intensity units. Returns (painted, mask)."""
    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    values = image[brain]
    if values.size == 0:
        return out, mask
    for _ in range(count):
        lo, hi = np.percentile(values, PERCENTILE_BANDS[int(rng.integers(len(PERCENTILE_BANDS)))])
        intensity = rng.uniform(lo, hi)
        axes = np.maximum(np.abs(rng.normal(4.0, 6.0, 2)), 2.0) * scale
        angle = rng.uniform(0.0, np.pi)
        shape = ellipse(image.shape, _centre(brain, rng), (float(axes[0]), float(axes[1])), angle) & brain
        out[shape] = intensity
        mask |= shape
    return out, mask


def paint_sprites(images: np.ndarray, brain: np.ndarray, rng: np.random.Generator, count: int = 3,
                  scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint the paper's sprites on a batch of slices.

    images: (N, H, W) in [0, 1]; brain: (N, H, W) bool. `scale` = native pixels per 128-pixel unit,
    by default max(H, W) / 128 (the preprocessing pads to a square and resizes to 128).
    Returns painted images (N, H, W) float32 and masks (N, H, W) bool, masks inside the brain.
    """
    images = np.asarray(images)
    brain = np.asarray(brain, dtype=bool)
    if images.ndim != 3 or brain.shape != images.shape:
        raise ValueError(f"images {images.shape} and brain {brain.shape} must both be (N, H, W)")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(f"images must lie in [0, 1]; got [{images.min():.3g}, {images.max():.3g}]")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    scale = max(images.shape[1:]) / REFERENCE_SIZE if scale is None else scale
    painted = np.empty(images.shape, dtype=np.float32)
    masks = np.zeros(images.shape, dtype=bool)
    for i in range(images.shape[0]):
        painted[i], masks[i] = paint_slice(images[i].astype(np.float32), brain[i], rng, count, scale)
    return painted, masks


def sprite_volume(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator,
                  count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sprites on the central band of axial slices of a RAS+ volume (X, Y, Z); returns (image, mask)."""
    z = np.flatnonzero(brain.any(axis=(0, 1)))
    out = image.astype(np.float32, copy=True)
    mask = np.zeros(image.shape, dtype=bool)
    if z.size == 0:
        return out, mask
    span = z[-1] - z[0] + 1
    half = max(1, round(span * BAND_FRACTION / 2))
    mid = (z[0] + z[-1]) // 2
    scale = max(image.shape[:2]) / REFERENCE_SIZE
    for k in range(max(z[0], mid - half), min(z[-1], mid + half) + 1):
        out[:, :, k], mask[:, :, k] = paint_slice(out[:, :, k], brain[:, :, k], rng, count, scale)
    return out, mask
