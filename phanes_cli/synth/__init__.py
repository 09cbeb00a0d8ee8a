"""Synthetic cohorts grown from real T1 templates (`phanes data synth`).

Healthy subjects are real templates (nilearn's bundled MNI152, plus any `--templates`) varied in
anatomy and acquisition; lesion subjects add stroke-like hypo-intensities (procedural or real lesion
shapes) or the paper's sprite anomalies, with exact ground-truth masks. Modules: templates (sources),
variation (subject/scan variation), lesions, sprites (also the 2D Table 1 protocol), cohort (on disk), options
(`data synth`'s flags).
"""

from phanes_cli.synth.cohort import make_subject, synth_cohort
from phanes_cli.synth.options import SynthOptions
from phanes_cli.synth.sprites import paint_sprites

__all__ = ["SynthOptions", "make_subject", "paint_sprites", "synth_cohort"]
