"""One volume's measurements from its anomaly map: the lesion rule of a calibration, then its table rows.

`phanes screen` (the write stage), `phanes_cli.predict` and `phanes stats` all measure a volume here, so
the three give the same row for the same map. What comes before (load, brain mask, quality check:
`inputs.brain_masks.load_checked`) and after (writing files, the run's own columns) is the caller's. A new
per-volume measurement goes into `measure_volume` and `VolumeMeasures`, and reaches all three at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phanes_cli.core.calibration import Calibration
from phanes_cli.core.lesion_rule import LesionRule
from phanes_cli.core.statistics import brain_statistics, volume_statistics
from phanes_cli.core.volume_io import Volume


@dataclass(frozen=True)
class VolumeMeasures:
    """What a volume's anomaly map gives under a calibration."""

    lesion_mask: np.ndarray  # bool on the RAS+ grid
    row: dict[str, Any]  # the volumes.parquet columns: QC flags, statistics, the calibration applied
    lesions: list[dict[str, Any]]  # the lesions.parquet rows, one per connected lesion


def measure_volume(vid: str, volume: Volume, brain: np.ndarray, anomaly: np.ndarray, calibration: Calibration,
                   qc_flags: Sequence[str], brain_stats: dict[str, float] | None = None, locate: bool = True
                   ) -> VolumeMeasures:
    """The lesion rule of `calibration` on s(x) (`anomaly`, RAS+ grid) inside `brain`, then the statistics.

    `brain_stats` (brain volume, max and mean of s(x)) defaults to `brain_statistics` of `brain`; `phanes stats`
    passes the screening row's. `locate`: `volume` is the T1 the lesions are placed in (`core.locations`);
    `phanes stats` passes False when the run's input image is gone or changed (location columns null).
    """
    lesion_mask = LesionRule.from_calibration(calibration).apply(anomaly, brain, volume.voxel_ml)
    if brain_stats is None:
        brain_stats = brain_statistics(volume, brain, anomaly)
    stats, lesions = volume_statistics(vid, volume, brain_stats, anomaly, lesion_mask, brain if locate else None)
    row = {"qc_flags": list(qc_flags), **stats, **calibration.columns()}
    return VolumeMeasures(lesion_mask=lesion_mask, row=row, lesions=lesions)
