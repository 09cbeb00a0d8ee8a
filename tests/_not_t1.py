"""Images that are not T1-weighted brains, for the `not_t1_brain` check (tests and benchmarks/t1_plausibility.py).

Other contrasts are drawn from the shipped label maps (`synth.label_maps`): each tissue class gets the relative
intensity the sequence gives it, then a little within-class spread, partial-volume blur and noise, as SynthSeg
draws a T1 from its priors. The class orders are the textbook ones: T2 CSF > grey > white matter; FLAIR grey >
white matter > CSF (suppressed); proton density CSF ~ grey > white matter; CT (Hounsfield units) grey 35-40 >
white 25-30 > CSF 0-15, bone ~1000. The phantoms are 1,200 mL balls, an ellipsoid and a brain-shaped mask holding
graded, layered or textured intensities; `limit_phantoms` are built past what the check can see.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from phanes_cli.synth.label_maps import LabelMap
from phanes_cli.synth.variation import VariationConfig, acquire

# prior class (synth.label_maps._CLASSES) -> intensity: 1 CSF, 2 white matter, 3 cortex, 4 cerebellar white matter,
# 5 cerebellar cortex, 6 thalamus, 7 caudate, 8 putamen, 9 pallidum, 10 hippocampus/amygdala, 12 vessel, 13 diencephalon
CONTRASTS: dict[str, dict[int, float]] = {
    "T2": {1: 1.0, 2: .35, 3: .55, 4: .35, 5: .55, 6: .45, 7: .55, 8: .5, 9: .35, 10: .6, 12: .2, 13: .45},
    "FLAIR": {1: .08, 2: .55, 3: .75, 4: .55, 5: .75, 6: .65, 7: .75, 8: .7, 9: .55, 10: .8, 12: .2, 13: .6},
    "PD": {1: .85, 2: .6, 3: .8, 4: .6, 5: .8, 6: .7, 7: .8, 8: .78, 9: .65, 10: .82, 12: .3, 13: .7},
    "CT": {1: 8, 2: 28, 3: 38, 4: 30, 5: 38, 6: 36, 7: 38, 8: 38, 9: 36, 10: 36, 12: 45, 13: 32},
}
BALL_MM = (1200e3 * 3 / 4 / np.pi) ** (1 / 3)  # radius of a 1,200 mL ball


def t1_subject(label_map: LabelMap, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A T1-like brain of the label map (SynthSeg's model with scanner effects): (image, brain)."""
    template = label_map.template(rng)
    brain = template.brain > 0
    return acquire(template.image, brain, rng, VariationConfig()), brain


def other_contrast(label_map: LabelMap, contrast: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The label map's brain as `contrast` (a CONTRASTS key) would show it: (image, brain); 1 mm voxels."""
    table = CONTRASTS[contrast]
    classes = label_map.classes()
    brain = label_map.labels > 0
    lut = np.zeros(int(classes.max()) + 1)
    for k, value in table.items():
        if k < lut.size:
            lut[k] = value
    image = lut[classes] * (1 + 0.04 * rng.standard_normal(classes.shape))
    image = ndimage.gaussian_filter(image * brain, 0.8)
    image += 0.02 * max(table.values()) * rng.standard_normal(image.shape)
    return np.where(brain, image, 0.0), brain


def ct_head(label_map: LabelMap, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT head in Hounsfield units: the CT brain inside 2 mm of CSF, 6 mm of bone and 5 mm of scalp, in air."""
    brain_image, brain = other_contrast(label_map, "CT", rng)
    pad = 16
    brain_image, brain = np.pad(brain_image, pad), np.pad(brain, pad)
    gap = ndimage.distance_transform_edt(~brain)
    layers = [(gap <= 2, 8.0), (gap <= 8, 1000.0), (gap <= 13, 30.0)]
    head = np.select([c for c, _ in layers], [v for _, v in layers], -1000.0)
    head = np.where(brain, brain_image, head) + 5 * rng.standard_normal(head.shape)
    return head, brain


def _texture(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def phantoms(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, mask) of phantoms on a 1 mm grid, each flagged by the check."""
    axes = np.mgrid[:150, :150, :150].astype(np.float32) - 75
    radius = np.sqrt((axes ** 2).sum(0))
    ball = radius <= BALL_MM
    depth = BALL_MM - radius
    shells = np.select([depth < 4, depth < 8, depth < 20], [30.0, 70.0, 100.0], 45.0)  # dark rim, grey, white, core
    ellipsoid = (axes[0] / 68) ** 2 + (axes[1] / 85) ** 2 + (axes[2] / 60) ** 2 <= 1
    e_depth = ndimage.distance_transform_edt(ellipsoid)
    e_shells = np.select([e_depth < 4, e_depth < 8, e_depth < 20], [30.0, 70.0, 100.0], 45.0)
    return [
        ("ball, uniform", np.where(ball, 100 + rng.standard_normal(ball.shape), 0), ball),
        ("ball, radial gradient", np.where(ball, 100 + 30 * (1 - radius / BALL_MM), 0), ball),
        ("ball, smooth texture", np.where(ball, 100 + 15 * _texture(ball.shape, 8, rng), 0), ball),
        ("ball, fine texture", np.where(ball, 100 + 10 * _texture(ball.shape, 3, rng), 0), ball),
        ("ball, gradient + texture",
         np.where(ball, 100 + 40 * (1 - radius / BALL_MM) + 10 * _texture(ball.shape, 4, rng), 0), ball),
        ("ball, 4 shells", np.where(ball, shells, 0), ball),
        ("ball, 4 shells + texture", np.where(ball, shells + 10 * _texture(ball.shape, 3, rng), 0), ball),
        ("ellipsoid, texture", np.where(ellipsoid, 100 + 10 * _texture(ball.shape, 3, rng), 0), ellipsoid),
        ("ellipsoid, 4 shells + texture", np.where(ellipsoid, e_shells + 10 * _texture(ball.shape, 3, rng), 0),
         ellipsoid),
    ]


def limit_phantoms(brain_shape: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Beyond the check: a brain's outline holding T1's layering (dark rim, grey, white inside) with texture.

    The four figures cannot tell these from a brain; whether one is flagged depends on the outline's shape."""
    depth = ndimage.distance_transform_edt(brain_shape)
    shells = np.select([depth < 2, depth < 5, depth < 20], [30.0, 70.0, 100.0], 50.0)
    graded = 100 + 40 * depth / depth.max()
    return [("brain outline, inward gradient + texture",
             np.where(brain_shape, graded + 10 * _texture(brain_shape.shape, 4, rng), 0.0), brain_shape),
            ("brain outline, 4 shells + texture",
             np.where(brain_shape, shells + 10 * _texture(brain_shape.shape, 3, rng), 0.0), brain_shape)]
