"""Where phanes' intensity normalisation puts the tissues of brains prepared differently (issue 20).

phanes divides a volume by the 98th percentile of its brain voxels (`core.preprocess.intensity_scale`). That
removes any linear difference between preparations (scanner gain, FreeSurfer's white matter at 110), but not a
change of tissue contrast (FreeSurfer's `norm` flattens white matter and stretches grey matter; N4 removes a
bias field the raw images keep). This prints, for every real T1 shipped with phanes (raw file, brain by phanes'
own rule) and for the synthesised subjects of a cohort, the three tissue peaks after that normalisation (a
3-class Gaussian mixture of the brain voxels: CSF, grey, white matter) and the grey/white and CSF/white
ratios, so a preparation whose contrast differs from the training brains' is visible before any model runs.

Usage: python benchmarks/intensity_preparations.py [--cohort runs/c20-f0.5/manifest.parquet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.mixture import GaussianMixture  # type: ignore[import-untyped]

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.preprocess import intensity_scale
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import read_manifest
from phanes_cli.synth.templates import template_files


def tissue_peaks(image: Path, brain_mask: Path | None) -> tuple[float, float, float]:
    """CSF, grey and white matter means of the normalised brain voxels (3-class mixture, 200k voxels)."""
    volume, brain, _ = load_with_brain(image, brain_mask, skull_strip="never")
    scaled = volume.data[brain] / intensity_scale(volume.data, brain, PreprocessConfig().percentile)
    rng = np.random.default_rng(0)
    sample = rng.choice(scaled, size=min(200_000, scaled.size), replace=False).reshape(-1, 1)
    means = np.sort(GaussianMixture(3, random_state=0).fit(sample).means_.ravel())
    return float(means[0]), float(means[1]), float(means[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, help="a `data synth` manifest: one subject per source and split")
    args = parser.parse_args()
    items: list[tuple[str, Path, Path | None]] = [(f"shipped file {p.name.split('.')[0]}", p, None)
                                                  for p in template_files()]
    if args.cohort:
        seen: set[tuple[str, str]] = set()
        for row in read_manifest(args.cohort):
            key = (str(row.extra.get("source")), row.split)
            if row.kind == "healthy" and key not in seen:
                seen.add(key)
                items.append((f"{row.split} subject of {key[0]}", row.image, row.brain_mask))
    print(f"{'volume':58}{'CSF':>6}{'GM':>6}{'WM':>6}{'GM/WM':>7}{'CSF/WM':>8}")
    for name, image, mask in items:
        csf, gm, wm = tissue_peaks(image, mask)
        print(f"{name:58}{csf:>6.2f}{gm:>6.2f}{wm:>6.2f}{gm / wm:>7.2f}{csf / wm:>8.2f}")


if __name__ == "__main__":
    main()
