"""Where each lesion lies: a location class and its contact with CSF, from the subject's own anatomy.

The classes are the ones MS and small-vessel studies count (LST-AI, MAGNIMS): `infratentorial` (cerebellum,
brainstem), `periventricular` (touching or within PERIVENTRICULAR_MM of a ventricle), `juxtacortical`
(in the cortex or within JUXTACORTICAL_MM of it) and `deep_white_matter` (every other supratentorial lesion,
deep grey nuclei included), tested in that order. `csf_contact` says whether a lesion lies in or against the
ventricles or the sulcal CSF, and `csf_fraction` how much of it has CSF intensity: a "lesion" that is mostly
CSF inside an enlarged ventricle reads `ventricle` with a fraction near 1, a periventricular infarct
`ventricle` with a small one.

The anatomy comes from the image alone, on its RAS+ grid:
- tissue: a three-class Gaussian mixture (CSF, grey, white matter) of the T1 intensities in the brain, fitted
  without the lesion voxels (EM in numpy: one dimension needs no library);
- ventricles: deep CSF (at least VENTRICLE_DEPTH_MM from the brain surface) in components of at least
  VENTRICLE_SEED_ML where the label maps put ventricles, grown through the CSF; the remaining CSF is sulcal;
- cortex: grey matter within CORTEX_DEPTH_MM of the brain surface or touching sulcal CSF;
- infratentorial: where at least INFRATENTORIAL_PRIOR of the 20 shipped individual label maps (SynthSeg's,
  `data/synthseg_label_maps.npz`; `data/location_priors.npz`, tools/build_location_priors.py) have cerebellum
  or brainstem, each place mapped by its brain's extent: left-right from the centre in half-widths,
  posterior-anterior in lengths, downwards from the top in lengths (the inferior end of a brain mask varies
  with how far down the brainstem the extraction went, so it is not used).
Lesion voxels never count as anatomy (a dark infarct is not a ventricle), but their own tissue class gives
`csf_fraction`. `benchmarks/lesion_locations.py` measures the classes against DLMUSE parcellations of real
brains (docs/lesion_locations.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from phanes_cli.infra.packaged_data import DATA_DIR

LOCATION_CLASSES = ("periventricular", "juxtacortical", "deep_white_matter", "infratentorial")
CSF_CONTACTS = ("ventricle", "sulcal", "none")
PERIVENTRICULAR_MM = 3.0
JUXTACORTICAL_MM = 3.0
VENTRICLE_DEPTH_MM = 12.0
VENTRICLE_SEED_ML = 0.3
VENTRICLE_PRIOR = 0.2
VENTRICLE_GROW_MM = 6.0
CORTEX_DEPTH_MM = 12.0
INFRATENTORIAL_PRIOR = 0.3  # a bin is infratentorial where at least this share of the label maps has it so
PRIORS = DATA_DIR / "location_priors.npz"  # tools/build_location_priors.py, from data/synthseg_label_maps.npz
PRIOR_LABELS = {"infratentorial": (7, 8, 46, 47, 15, 16),  # FreeSurfer: cerebellum, 4th ventricle, brainstem
                 "ventricle": (4, 43, 5, 44, 14)}  # lateral, inferior lateral and 3rd ventricles
_HISTOGRAM_BINS = 512
PRIOR_BINS = (12, 32, 32)  # |left-right| in half-widths, posterior-anterior and top-down in lengths
PRIOR_RANGE = ((0.0, 1.0), (0.0, 1.0), (0.0, 1.0))


@dataclass(frozen=True)
class Anatomy:
    """The zones lesions are placed in, bool (X, Y, Z) on the image's RAS+ grid, and each voxel's tissue."""

    tissue: np.ndarray  # uint8: 0 outside the brain, 1 CSF, 2 grey, 3 white matter
    ventricles: np.ndarray
    sulcal_csf: np.ndarray
    cortex: np.ndarray
    infratentorial: np.ndarray


@dataclass(frozen=True)
class LesionLocation:
    """One lesion's place: its class, the CSF it lies in or against, and the fraction of it with CSF intensity."""

    location: str  # one of LOCATION_CLASSES
    csf_contact: str  # one of CSF_CONTACTS
    csf_fraction: float


def tissue_classes(image: np.ndarray, brain: np.ndarray, fit: np.ndarray, iterations: int = 60) -> np.ndarray:
    """CSF 1 / grey 2 / white 3 (0 outside `brain`): a 1D three-Gaussian mixture fitted on the voxels of `fit`
    (k-means, then EM, on a 512-bin histogram of them: the same fit at a fraction of the cost), each voxel
    to its likeliest class."""
    values = image[fit].astype(np.float64)
    if values.size == 0:
        raise ValueError("no brain voxels to tell CSF, grey and white matter apart")
    low, high = np.percentile(values, [0.5, 99.5])
    counts, edges = np.histogram(np.clip(values, low, high), bins=_HISTOGRAM_BINS, range=(low, high + 1e-6))
    centres = (edges[:-1] + edges[1:]) / 2
    means = np.array([low, (low + high) / 2, high])
    for _ in range(20):  # k-means on the histogram first, from evenly spread means: a small CSF class still gets one
        nearest = np.argmin(np.abs(centres[:, None] - means), axis=1)
        means = np.array([np.average(centres[nearest == k], weights=counts[nearest == k] + 1e-12)
                          if np.any(nearest == k) else means[k] for k in range(3)])
    spread = max(float(high - low), 1e-6)
    sds, weights = np.full(3, spread / 6), np.full(3, 1 / 3)
    for _ in range(iterations):
        resp = _responsibilities(centres, means, sds, weights) * counts[:, None]
        total = resp.sum(axis=0) + 1e-12
        weights = total / total.sum()
        means = (resp * centres[:, None]).sum(axis=0) / total
        sds = np.sqrt((resp * (centres[:, None] - means) ** 2).sum(axis=0) / total) + spread * 1e-3
    order = np.argsort(means)
    lookup = np.argmax(_responsibilities(centres, means[order], sds[order], weights[order]), axis=1)
    bins = np.clip(np.searchsorted(edges, image[brain], side="right") - 1, 0, _HISTOGRAM_BINS - 1)
    tissue = np.zeros(image.shape, dtype=np.uint8)
    tissue[brain] = lookup[bins].astype(np.uint8) + 1
    return tissue


def _responsibilities(values: np.ndarray, means: np.ndarray, sds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    log = np.log(weights) - np.log(sds) - 0.5 * ((values[:, None] - means) / sds) ** 2
    log -= log.max(axis=1, keepdims=True)
    resp = np.exp(log)
    return resp / resp.sum(axis=1, keepdims=True)


def brain_frame(brain: np.ndarray, zooms: tuple[float, float, float]) -> np.ndarray:
    """Every voxel's place in its brain, (3, X, Y, Z): |left-right| from the centre in half-widths,
    posterior-anterior from the back in lengths, downwards from the top in lengths (RAS+ grid)."""
    spans = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([s[0] for s in spans], dtype=np.float64) * zooms
    hi = np.array([s[-1] for s in spans], dtype=np.float64) * zooms
    length = max(hi[1] - lo[1], 1e-6)
    axes = [np.arange(n, dtype=np.float64) * z for n, z in zip(brain.shape, zooms, strict=True)]
    x = np.abs(axes[0] - (lo[0] + hi[0]) / 2) / max((hi[0] - lo[0]) / 2, 1e-6)
    y = (axes[1] - lo[1]) / length
    z = (hi[2] - axes[2]) / length
    return np.stack(np.broadcast_arrays(x[:, None, None], y[None, :, None], z[None, None, :])).astype(np.float32)


def prior_index(frame: np.ndarray) -> np.ndarray:
    """Bin of every voxel in the prior's table; -1 outside its range."""
    index = np.zeros(frame.shape[1:], dtype=np.int64)
    valid = np.ones(frame.shape[1:], dtype=bool)
    for axis, (bins, (low, high)) in enumerate(zip(PRIOR_BINS, PRIOR_RANGE, strict=True)):
        b = np.floor((frame[axis] - low) / (high - low) * bins).astype(np.int64)
        valid &= (b >= 0) & (b < bins)
        index = index * bins + np.clip(b, 0, bins - 1)
    return np.where(valid, index, -1)


@functools.lru_cache(maxsize=1)
def location_priors(path: Path = PRIORS) -> dict[str, np.ndarray]:
    """The shipped P(infratentorial) and P(ventricle) per bin of `brain_frame` (flat, PRIOR_BINS in C order)."""
    with np.load(path) as archive:
        priors = {name: np.asarray(archive[name], dtype=np.float64) for name in PRIOR_LABELS}
    for name, prior in priors.items():
        if prior.shape != (int(np.prod(PRIOR_BINS)),):
            raise ValueError(f"{path}: {name} prior has shape {prior.shape}; rebuild it "
                             "(tools/build_location_priors.py)")
    return priors


def prior_map(brain: np.ndarray, zooms: tuple[float, float, float], name: str) -> np.ndarray:
    """The label maps' probability `name` (infratentorial, ventricle) at every voxel (0 outside the brain)."""
    index = prior_index(brain_frame(brain, zooms))
    prior = location_priors()[name]
    return np.where(brain & (index >= 0), prior[np.maximum(index, 0)], 0.0).astype(np.float32)


def _ventricles(csf: np.ndarray, depth: np.ndarray, prior: np.ndarray, voxel_ml: float) -> np.ndarray:
    """CSF components whose deep part (VENTRICLE_DEPTH_MM) holds VENTRICLE_SEED_ML where the label maps put
    ventricles (mean prior VENTRICLE_PRIOR), grown through the CSF deeper than VENTRICLE_GROW_MM."""
    labels, n = ndimage.label(csf & (depth >= VENTRICLE_DEPTH_MM))
    if n == 0:
        return np.zeros_like(csf)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)
    mean_prior = np.bincount(labels.ravel(), weights=prior.ravel(), minlength=n + 1) / np.maximum(voxels, 1)
    keep = (voxels * voxel_ml >= VENTRICLE_SEED_ML) & (mean_prior >= VENTRICLE_PRIOR)
    keep[0] = False
    return np.asarray(ndimage.binary_propagation(keep[labels], mask=csf & (depth >= VENTRICLE_GROW_MM)))


def brain_anatomy(image: np.ndarray, brain: np.ndarray, zooms: tuple[float, float, float],
                  exclude: np.ndarray | None = None) -> Anatomy:
    """Tissue classes and location zones of one brain (RAS+ arrays); `exclude` (lesions) is never anatomy."""
    brain = np.asarray(brain, dtype=bool)
    healthy = brain if exclude is None else brain & ~np.asarray(exclude, dtype=bool)
    tissue = tissue_classes(image, brain, healthy if healthy.any() else brain)
    depth = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=zooms)[1:-1, 1:-1, 1:-1]
    csf = healthy & (tissue == 1)
    ventricles = _ventricles(csf, depth, prior_map(brain, zooms, "ventricle"), float(np.prod(zooms)) / 1000.0)
    sulcal = csf & ~ventricles
    grey = healthy & (tissue == 2)
    cortex = grey & ((depth <= CORTEX_DEPTH_MM) | ndimage.binary_dilation(sulcal))
    return Anatomy(tissue=tissue, ventricles=ventricles, sulcal_csf=sulcal, cortex=cortex,
                   infratentorial=prior_map(brain, zooms, "infratentorial") > INFRATENTORIAL_PRIOR)


def _distance_to(zone: np.ndarray, zooms: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of `zone` (inf when the zone is empty)."""
    if not zone.any():
        return np.full(zone.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~zone, sampling=zooms).astype(np.float32)


def classify_lesions(anatomy: Anatomy, labels: np.ndarray, n: int, zooms: tuple[float, float, float]
                     ) -> list[LesionLocation]:
    """The place of lesions 1..n of a label array (0 = background) in `anatomy`, in label order."""
    if n == 0:
        return []
    flat = np.flatnonzero(labels)
    lesion = labels.ravel()[flat]
    counts = np.bincount(lesion, minlength=n + 1)[1:].astype(np.float64)

    def share(zone: np.ndarray) -> np.ndarray:
        return np.bincount(lesion, weights=zone.ravel()[flat], minlength=n + 1)[1:] / np.maximum(counts, 1)

    def nearest(zone: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.minimum(_distance_to(zone, zooms).ravel()[flat], lesion, np.arange(1, n + 1)))

    touching = ndimage.binary_dilation(labels > 0, ndimage.generate_binary_structure(3, 3))
    grown = ndimage.grey_dilation(labels, footprint=np.ones((3, 3, 3), dtype=bool)) * touching
    near = np.flatnonzero(grown)
    owner = grown.ravel()[near]
    on_ventricle = np.bincount(owner, weights=anatomy.ventricles.ravel()[near], minlength=n + 1)[1:] > 0
    on_sulcus = np.bincount(owner, weights=anatomy.sulcal_csf.ravel()[near], minlength=n + 1)[1:] > 0
    infra, csf = share(anatomy.infratentorial), share(anatomy.tissue == 1)
    to_ventricle, to_cortex = nearest(anatomy.ventricles), nearest(anatomy.cortex)
    out = []
    for i in range(n):
        if infra[i] >= 0.5:
            place = "infratentorial"
        elif to_ventricle[i] <= PERIVENTRICULAR_MM:
            place = "periventricular"
        elif to_cortex[i] <= JUXTACORTICAL_MM:
            place = "juxtacortical"
        else:
            place = "deep_white_matter"
        contact = "ventricle" if on_ventricle[i] else "sulcal" if on_sulcus[i] else "none"
        out.append(LesionLocation(place, contact, float(csf[i])))
    return out


def lesion_locations(image: np.ndarray, brain: np.ndarray, labels: np.ndarray, zooms: tuple[float, float, float]
                     ) -> list[LesionLocation]:
    """The place of every lesion of a label array (1..n, 0 = background), all arrays on one RAS+ grid."""
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    return classify_lesions(brain_anatomy(image, brain, zooms, exclude=labels > 0), labels, n, zooms)
