"""`metrics.csv`: one row per validation event with the mean step losses since the previous one.

Rows are appended as training goes, so a killed run keeps its history; a resumed run first drops the
rows logged after its last checkpoint, which it is about to log again.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from phanes_cli.infra.atomic import atomic_path

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = ("stage", "epoch", "step", "loss_encoder", "loss_decoder", "rec", "kl", "fake", "reversed",
                  "loss_generator", "l1", "style", "perceptual", "adv", "loss_discriminator",
                  "val_loss", "best_val", "seconds")


class MetricsLog:
    """The CSV file of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop rows a killed session logged after its last checkpoint (they will be logged again)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if (int(r["stage"]), int(r["step"])) <= (stage, step)]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items() if k in METRIC_COLUMNS})


class Averages:
    """Running means of the step losses since the last validation."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}
