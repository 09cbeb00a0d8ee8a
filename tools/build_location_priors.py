"""Build phanes_cli/data/location_priors.npz, the anatomy priors of `core.locations` (run once; output committed).

For each bin of `core.locations.brain_frame` (|left-right| from the centre in half-widths, posterior-anterior in
lengths, downwards from the top in lengths), the fraction of brain voxels of the 20 shipped SynthSeg label maps
(`data/synthseg_label_maps.npz`, Apache-2.0) that are cerebellum, brainstem or 4th ventricle (`infratentorial`),
and that are a lateral, inferior lateral or 3rd ventricle (`ventricle`). A few minutes on one loaded core.

Usage: python tools/build_location_priors.py
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from phanes_cli.core.locations import PRIOR_BINS, PRIOR_LABELS, PRIORS, brain_frame, prior_index
from phanes_cli.infra.atomic import atomic_path
from phanes_cli.infra.packaged_data import DATA_DIR

LABEL_MAPS = DATA_DIR / "synthseg_label_maps.npz"


def label_map_priors() -> dict[str, np.ndarray]:
    """Each prior of PRIOR_LABELS over the label maps, flat (PRIOR_BINS in C order); 0 where no brain falls."""
    size = int(np.prod(PRIOR_BINS))
    sums, total = {name: np.zeros(size) for name in PRIOR_LABELS}, np.zeros(size)
    with np.load(LABEL_MAPS) as archive:
        for key in sorted(k for k in archive.files if k.endswith("/labels")):
            affine = archive[key.replace("/labels", "/affine")]
            ornt = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
            labels = nib.apply_orientation(archive[key], ornt)
            zooms = np.empty(3)
            zooms[ornt[:, 0].astype(int)] = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            brain = labels > 0
            index = prior_index(brain_frame(brain, (zooms[0], zooms[1], zooms[2])))[brain]
            keep = index >= 0
            total += np.bincount(index[keep], minlength=size)
            for name, wanted in PRIOR_LABELS.items():
                hits = np.isin(labels[brain][keep], wanted)
                sums[name] += np.bincount(index[keep], weights=hits, minlength=size)
            print(key.split("/")[0], flush=True)
    return {name: (np.where(total > 0, s / np.maximum(total, 1), 0.0)).astype(np.float32) for name, s in sums.items()}


def main() -> None:
    priors = label_map_priors()
    with atomic_path(PRIORS) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **priors)  # type: ignore[arg-type]
    print(f"wrote {PRIORS}: " + ", ".join(f"{k} {int((v > 0.5).sum())} bins > 0.5" for k, v in priors.items()))


if __name__ == "__main__":
    main()
