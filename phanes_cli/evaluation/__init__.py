"""Evaluation of anomaly maps against lesion segmentations.

`metrics` accumulates pixel AUPRC, best Dice over a threshold sweep, Dice at the calibrated threshold,
lesion-wise detection and lesion-volume error over a cohort without keeping voxels in memory;
`lesions` holds the connected-component helpers shared with screening.
"""

from phanes_cli.core.components import label_components, lesion_table
from phanes_cli.evaluation.detection import LesionDetection, lesion_detection
from phanes_cli.evaluation.metrics import CohortMetrics, PRHistogram, VolumeScores, dice

__all__ = [
    "CohortMetrics",
    "LesionDetection",
    "PRHistogram",
    "VolumeScores",
    "dice",
    "label_components",
    "lesion_detection",
    "lesion_table",
]
