"""T1 plausibility check (`quality.not_t1_brain`): its two figures on every real brain in ../shared/data and
on images that are not T1 brains, to show the margins behind its limits.

Real brains: healthy-t1 (brain mask by threshold, as screening finds it), head-t1 (brain mask by the
deepbet model, as `--skull-strip auto` gives it: ~1-2 min per head on a CPU), glioma-t1 patients, the
shipped data/healthy_t1 and nilearn's MNI152. Not T1 brains: each real brain with inverted contrast inside
its mask (T2-like: CSF bright), and 1,200 mL balls (uniform, a radial gradient, smooth blobs).
Run: PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/t1_plausibility.py [--no-heads]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from phanes_cli.core.volume_io import load_volume
from phanes_cli.inputs.brain_masks import brain_mask_for
from phanes_cli.inputs.quality import GRID_MM, MAX_DEPTH_EXPLAINED, MAX_SHELL_TO_DEEP, t1_contrast

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHIPPED = Path(__file__).resolve().parents[1] / "phanes_cli" / "data" / "healthy_t1"


def figures(data: np.ndarray, brain: np.ndarray, zooms: tuple[float, ...]) -> tuple[float, float]:
    """`t1_contrast` on the check grid, as `check_volume` runs it."""
    z = np.asarray(zooms, dtype=np.float64)
    step = np.maximum(1, np.floor(GRID_MM / z)).astype(int)
    grid = tuple(slice(None, None, int(s)) for s in step)
    return t1_contrast(data[grid], brain[grid], z * step)


def line(name: str, data: np.ndarray, brain: np.ndarray, zooms: tuple[float, ...]) -> bool:
    ratio, spread = figures(data, brain, zooms)
    flagged = spread >= MAX_DEPTH_EXPLAINED or ratio >= MAX_SHELL_TO_DEEP
    print(f"{name:58s} ratio {ratio:5.2f}  depth share {spread:5.2f}  {'FLAGGED' if flagged else 'ok'}", flush=True)
    return flagged


def real_brains(heads: bool) -> list[tuple[str, Path, str]]:
    found = [(f"healthy-t1/{p.name}", p, "never") for p in sorted((DATA / "healthy-t1").glob("*.nii.gz"))]
    found += [(f"shipped/{p.name}", p, "never") for p in sorted(SHIPPED.glob("*.nii.gz"))]
    found += [(f"glioma-t1/{p.parent.name}", p, "never") for p in sorted((DATA / "glioma-t1").glob("*/T1.nii.gz"))]
    if heads:
        found += [(f"head-t1/{p.name}", p, "always") for p in sorted((DATA / "head-t1").glob("*.nii.gz"))]
    try:
        from nilearn.datasets import load_mni152_template

        template = load_mni152_template(resolution=1)
        path = Path("/tmp/phanes_mni152_nilearn.nii.gz")
        template.to_filename(str(path))
        found.append(("nilearn MNI152 2009a", path, "never"))
    except ImportError:
        pass
    return found


def phantoms() -> list[tuple[str, np.ndarray, np.ndarray]]:
    grid = np.mgrid[:160, :160, :160].astype(np.float32)
    radius = np.sqrt(((grid - 80) ** 2).sum(0))
    edge = (1200e3 * 3 / 4 / np.pi) ** (1 / 3)
    ball = radius <= edge
    blobs = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=ball.shape), 8)
    blobs /= blobs.std()
    return [("ball 1200 mL, uniform", np.where(ball, 100.0, 0.0), ball),
            ("ball, radial gradient", np.where(ball, 100.0 + 30 * (1 - radius / edge), 0.0), ball),
            ("ball, smooth blobs", np.where(ball, 100.0 + 15 * blobs, 0.0), ball)]


def main() -> None:
    real_flagged, fakes, fake_flagged = 0, 0, 0
    brains = real_brains("--no-heads" not in sys.argv)
    for name, path, mode in brains:
        volume = load_volume(path)
        brain, _ = brain_mask_for(volume, None, mode)
        real_flagged += line(name, volume.data, brain, volume.zooms)
        inverted = np.where(brain, float(volume.data[brain].max()) - volume.data, 0.0)
        fake_flagged += line("  same brain, contrast inverted", inverted, brain, volume.zooms)
        fakes += 1
    for name, data, mask in phantoms():
        fake_flagged += line(name, data, mask, (1.0, 1.0, 1.0))
        fakes += 1
    print(f"real brains flagged: {real_flagged} of {len(brains)}; not-T1 images flagged: {fake_flagged} of {fakes}")


if __name__ == "__main__":
    main()
