"""Burden read against age: a robust trend and the volumes far above their own age group, within this cohort.

The reference is the cohort itself, never normative data of healthy people: each screened volume is
compared with the volumes of its age group in the same run. Rules, stated on the report page as well:

- the age column is a numeric column named `age` (or a name holding the word `age`, such as
  `participants_age` or `age_years`); a volume without an age is left out of this reading;
- age groups hold about equal numbers of volumes: one group per `GROUP_SIZE` volumes (at least one,
  at most `MAX_GROUPS`), cut at the quantiles of age, so no group is too small to have a median;
- within a group, a volume is flagged when its burden exceeds the group's median + `K_MAD` x the scaled
  MAD (1.4826 x the median absolute deviation, the standard deviation's robust stand-in), with the spread
  taken as at least `MIN_SPREAD_ML`: in a cohort where most burdens are 0 the MAD is 0, and a few tenths
  of a mL would otherwise read as far above;
- the trend is the running median of burden over the volumes sorted by age (`scipy.ndimage.median_filter`,
  a window of about a fifth of them, odd, at least 3).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import median_filter

K_MAD = 3.0
MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normally distributed values
MIN_SPREAD_ML = 1.0
GROUP_SIZE = 10
MAX_GROUPS = 6
MIN_VOLUMES = 5  # fewer aged volumes: no reading (a median of three is no reference)


@dataclass(frozen=True)
class AgeGroup:
    """One age group: its age range, size, median burden and the burden above which a volume is flagged."""

    low: float
    high: float
    count: int
    median_ml: float
    limit_ml: float


@dataclass(frozen=True)
class AgeReading:
    """Ages, burdens and ids of the aged volumes (sorted by age), the trend, the groups and the flagged indices."""

    column: str
    ids: list[str]
    ages: np.ndarray
    burdens: np.ndarray
    trend: np.ndarray
    groups: list[AgeGroup]
    group_of: np.ndarray  # index into `groups` per volume
    flagged: list[int]


def age_column(volumes: list[dict[str, Any]]) -> str | None:
    """The first column named `age` or holding the word age whose values are numbers; None when there is none."""
    names = sorted({k for v in volumes for k in v}, key=lambda n: (n.lower() != "age", n))
    for name in names:
        if "age" not in re.split(r"[_\-. ]", name.lower()):
            continue
        values = [v.get(name) for v in volumes if v.get(name) is not None]
        if values and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            return name
    return None


def _groups(ages: np.ndarray) -> np.ndarray:
    """Group index per volume: about GROUP_SIZE volumes per group, cut at age quantiles (ties stay together)."""
    count = max(1, min(MAX_GROUPS, ages.size // GROUP_SIZE))
    edges = np.unique(np.quantile(ages, np.linspace(0, 1, count + 1)[1:-1]))
    return np.searchsorted(edges, ages, side="right")


def read_by_age(volumes: list[dict[str, Any]]) -> AgeReading | None:
    """The age reading of the screened volumes (status ok, a finite burden and age), or None without enough of them."""
    column = age_column(volumes)
    if column is None:
        return None
    rows = [(float(v[column]), float(v["lesion_burden_ml"]), str(v["id"])) for v in volumes
            if v.get("status") == "ok" and isinstance(v.get(column), (int, float))
            and isinstance(v.get("lesion_burden_ml"), (int, float))
            and math.isfinite(v[column]) and math.isfinite(v["lesion_burden_ml"])]
    if len(rows) < MIN_VOLUMES:
        return None
    rows.sort()
    ages = np.array([r[0] for r in rows])
    burdens = np.array([r[1] for r in rows])
    window = max(3, (len(rows) // 5) | 1)
    trend = median_filter(burdens, size=window, mode="nearest")
    group_of = _groups(ages)
    groups, flagged = [], []
    for index in range(int(group_of.max()) + 1):
        members = np.flatnonzero(group_of == index)
        values = burdens[members]
        median = float(np.median(values))
        spread = max(MAD_SCALE * float(np.median(np.abs(values - median))), MIN_SPREAD_ML)
        limit = median + K_MAD * spread
        groups.append(AgeGroup(float(ages[members].min()), float(ages[members].max()), members.size, median, limit))
        flagged += [int(i) for i in members if burdens[i] > limit]
    return AgeReading(column, [r[2] for r in rows], ages, burdens, trend, groups, group_of, sorted(flagged))
