"""Cohort charts as inline SVG, with axes, ticks and units: burden and count histograms, burden by covariate,
burden against age.

Every text drawn from data (covariate names and levels) is escaped; numbers are formatted here.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from phanes_cli.cohort_report.age_groups import AgeReading

WIDTH, HEIGHT = 440, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 12, 44
MAX_LEVELS = 30  # a covariate with more distinct values is an identifier or a number, not a grouping
MAX_POINTS = 600  # points drawn per chart; above that the boxes alone tell the spread


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps; whole numbers when `integer`) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else [0.0]
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    step = max(step, 1) if integer else step
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil((high - first) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _x_axis(ticks: list[float], scale: Any, label: str, start: float = LEFT) -> str:
    base = HEIGHT - BOTTOM
    marks = "".join(f'<line x1="{scale(t):.1f}" y1="{base}" x2="{scale(t):.1f}" y2="{base + 4}"/>'
                    f'<text x="{scale(t):.1f}" y="{base + 15}" text-anchor="middle">{_fmt(t)}</text>' for t in ticks)
    return (f'<g class="axis"><line x1="{start}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>{marks}'
            f'<text class="label" x="{(start + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
            f"{html.escape(label)}</text></g>")


def _y_axis(ticks: list[float], scale: Any, label: str) -> str:
    marks = "".join(f'<line x1="{LEFT - 4}" y1="{scale(t):.1f}" x2="{LEFT}" y2="{scale(t):.1f}"/>'
                    f'<text x="{LEFT - 6}" y="{scale(t) + 3:.1f}" text-anchor="end">{t:g}</text>' for t in ticks)
    return (f'<g class="axis"><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>{marks}'
            f'<text class="label" transform="translate(12 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(label)}</text></g>')


def _svg(body: str, title: str, note: str) -> str:
    return (f'<figure class="chart"><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(title)}">'
            f'{body}</svg><figcaption>{html.escape(title)} ({html.escape(note)})</figcaption></figure>')


def histogram_svg(values: Sequence[float | None], title: str, axis_label: str, bins: int = 20) -> str:
    """A histogram: x in the value's unit, y the number of volumes, both with ticks; counts in tooltips.

    Whole-number data (counts) get one bar per value, centred on it, so no bar straddles two counts.
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size == 0:
        return f'<figure class="chart"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    whole = bool(np.all(data == np.round(data))) and data.max() - data.min() <= 60
    low, high = (data.min() - 0.5, data.max() + 0.5) if whole else (data.min(), data.max())
    xt = nice_ticks(float(low), float(high) if high > low else float(low) + 1, integer=whole)
    edges_wanted: Any = np.arange(data.min() - 0.5, data.max() + 1.5) if whole else bins
    counts, edges = np.histogram(data, bins=edges_wanted, range=None if whole else (xt[0], xt[-1]))
    yt = nice_ticks(0, max(int(counts.max()), 1), 4, integer=True)

    def sx(v: float) -> float:
        return LEFT + (v - xt[0]) / (xt[-1] - xt[0]) * (WIDTH - LEFT - RIGHT)

    def sy(v: float) -> float:
        return HEIGHT - BOTTOM - v / yt[-1] * (HEIGHT - BOTTOM - TOP)

    spans = [_fmt(a + 0.5) if whole else f"{_fmt(a)} to {_fmt(b)}" for a, b in itertools.pairwise(edges)]
    bars = "".join(f'<rect x="{sx(edges[i]):.1f}" y="{sy(n):.1f}" '
                   f'width="{max(sx(edges[i + 1]) - sx(edges[i]) - 1, 0.5):.1f}" height="{sy(0) - sy(n):.1f}">'
                   f"<title>{spans[i]}: {n} volumes"
                   f"</title></rect>" for i, n in enumerate(counts) if n)
    return _svg(bars + _x_axis(xt, sx, axis_label) + _y_axis(yt, sy, "volumes"), title, f"n = {data.size}")


def categorical_columns(volumes: list[dict[str, Any]], known: set[str]) -> list[str]:
    """String columns outside the known schema with 2..MAX_LEVELS values, one of them shared: the groupings."""
    names = sorted({k for v in volumes for k in v} - known)
    chosen = []
    for name in names:
        values = [v.get(name) for v in volumes if v.get(name) not in (None, "")]
        if not values or not all(isinstance(x, str) for x in values):
            continue
        levels = set(values)
        if 2 <= len(levels) <= MAX_LEVELS and len(levels) < len(values):
            chosen.append(name)
    return chosen


def _box(values: np.ndarray, y: float, sx: Any, draw_points: bool) -> str:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    low, high = sx(values.min()), sx(values.max())
    parts = [f'<line class="whisker" x1="{low:.1f}" y1="{y:.1f}" x2="{high:.1f}" y2="{y:.1f}"/>',
             f'<rect class="box" x="{sx(q1):.1f}" y="{y - 7:.1f}" width="{max(sx(q3) - sx(q1), 1):.1f}" height="14"/>',
             f'<line class="median" x1="{sx(med):.1f}" y1="{y - 8:.1f}" x2="{sx(med):.1f}" y2="{y + 8:.1f}"/>']
    if draw_points:
        jitter = (np.arange(values.size) * 0.618 % 1 - 0.5) * 10
        parts += [f'<circle cx="{sx(v):.1f}" cy="{y + j:.1f}" r="2"/>' for v, j in zip(values, jitter, strict=True)]
    return "".join(parts)


def burden_by_svg(volumes: list[dict[str, Any]], column: str) -> str:
    """Lesion burden per level of one covariate: box (quartiles), median line, whiskers to min and max, points."""
    groups: dict[str, list[float]] = {}
    for v in volumes:
        burden, level = v.get("lesion_burden_ml"), v.get(column)
        if isinstance(burden, float) and math.isfinite(burden) and level not in (None, ""):
            groups.setdefault(str(level), []).append(burden)
    if not groups:
        return f'<figure class="chart"><figcaption>burden by {html.escape(column)}: no data</figcaption></figure>'
    levels = sorted(groups)
    every = np.concatenate([np.asarray(groups[k]) for k in levels])
    xt = nice_ticks(0.0, float(every.max()) if every.max() > 0 else 1.0)
    row_h = (HEIGHT - BOTTOM - TOP) / len(levels)

    start = LEFT + 60

    def sx(v: float) -> float:
        return start + (v - xt[0]) / (xt[-1] - xt[0]) * (WIDTH - start - RIGHT)

    body = []
    for i, level in enumerate(levels):
        y = TOP + row_h * (i + 0.5)
        body.append(f'<text x="{start - 6}" y="{y + 3:.1f}" text-anchor="end"><title>{html.escape(level)}</title>'
                    f"{html.escape(level[:14])} (n={len(groups[level])})</text>")
        body.append(_box(np.asarray(groups[level]), y, sx, every.size <= MAX_POINTS))
    return _svg("".join(body) + _x_axis(xt, sx, "lesion burden (mL)", start), f"Lesion burden by {column}",
                f"{len(levels)} groups, n = {every.size}; box: quartiles, line: median, whiskers: range")


def burden_by_age_svg(reading: AgeReading) -> str:
    """Burden against age: one point per volume (flagged ones ringed), the running median, and each age group's
    flagging limit as a dashed segment; id, age and burden in each point's tooltip."""
    ages, burdens = reading.ages, reading.burdens
    xt = nice_ticks(float(ages.min()), float(ages.max()) if ages.max() > ages.min() else float(ages.min()) + 1)
    top = max(float(burdens.max()), max(g.limit_ml for g in reading.groups), 1.0)
    yt = nice_ticks(0.0, top, 4)

    def sx(v: float) -> float:
        return LEFT + (v - xt[0]) / (xt[-1] - xt[0]) * (WIDTH - LEFT - RIGHT)

    def sy(v: float) -> float:
        return HEIGHT - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (HEIGHT - BOTTOM - TOP)

    flagged = set(reading.flagged)
    limits = "".join(f'<line class="limit" x1="{sx(g.low):.1f}" y1="{sy(g.limit_ml):.1f}" x2="{sx(g.high):.1f}" '
                     f'y2="{sy(g.limit_ml):.1f}"><title>ages {_fmt(g.low)} to {_fmt(g.high)}: flagged above '
                     f"{_fmt(g.limit_ml)} mL (median {_fmt(g.median_ml)} mL, n={g.count})</title></line>"
                     for g in reading.groups)
    trend = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(ages, reading.trend, strict=True))
    points = "".join(f'<circle class="{"flagged" if i in flagged else "point"}" cx="{sx(a):.1f}" cy="{sy(b):.1f}" '
                     f'r="{3.5 if i in flagged else 2}"><title>{html.escape(vid)}: age {_fmt(a)}, '
                     f"{_fmt(b)} mL</title></circle>"
                     for i, (vid, a, b) in enumerate(zip(reading.ids, ages, burdens, strict=True)))
    body = (f'{limits}<polyline class="trend" points="{trend}"/>{points}'
            f"{_x_axis(xt, sx, f'{reading.column} (years)')}{_y_axis(yt, sy, 'lesion burden (mL)')}")
    return _svg(body, f"Lesion burden against {reading.column}",
                f"n = {ages.size}; line: running median; dashes: each age group's flagging limit; "
                f"ringed: {len(flagged)} flagged")
