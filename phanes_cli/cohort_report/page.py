"""`phanes report`: the cohort page of a screening run, and a page with a viewer for the volumes worth a look.

The cohort page (self-contained: no server, no CDN) holds the summary, charts with axes and units
(burden and lesion-count histograms, burden by each categorical covariate of the volumes table; with an age
column, burden against age and the volumes far above their age group, `age_groups`), the
per-volume table (rows travel as embedded JSON; the browser sorts, filters and pages them, so 10,000
rows stay fast), a CSV download, a QC verdict per volume kept in the browser and exported as CSV or
JSON, the failures and the QC figures of the top volumes. Each id with a page links to
`report/volumes/<stem>.html` (`viewer.py`); pages are written for the top N by burden, the flagged
volumes (qc_flags not empty, at most `max_pages` of them) and any id asked for.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phanes_cli.cohort_report.age_groups import K_MAD, MIN_SPREAD_ML, AgeReading, read_by_age
from phanes_cli.cohort_report.cases import load_case
from phanes_cli.cohort_report.charts import burden_by_age_svg, burden_by_svg, categorical_columns, histogram_svg
from phanes_cli.cohort_report.figures import png_base64, render_case, save_png
from phanes_cli.cohort_report.safe import fill, inside, json_for_script, safe_stem
from phanes_cli.cohort_report.viewer import write_case_page
from phanes_cli.core.statistics import LOCATION_BURDEN_COLUMNS
from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_text
from phanes_cli.infra.versions import __version__
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import FAILURE_SCHEMA, VOLUME_SCHEMA

LESION_COLUMNS = ("id", "lesion_index", "centroid_world_mm", "volume_ml", "location", "csf_contact", "csf_fraction")
TABLE_COLUMNS = ("id", "status", "lesion_burden_ml", "lesion_count", "largest_lesion_ml",
                 *LOCATION_BURDEN_COLUMNS.values(), "brain_volume_ml",
                 "lesion_burden_fraction", "max_anomaly", "mean_anomaly", "slices_processed", "qc_flags", "runtime_s")
NOT_COVARIATES = set(VOLUME_SCHEMA.names) | set(FAILURE_SCHEMA.names) | {"brain_mask", "lesion_mask", "split"}
REPORT_FOLDER = "report"


@dataclass
class ReportResult:
    """What `render_report` wrote, and the volumes it could not draw (id, reason)."""

    html: Path
    figures: list[Path] = field(default_factory=list)
    pages: list[Path] = field(default_factory=list)
    volumes: int = 0
    failed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _read_table(layout: OutputLayout, name: str) -> list[dict[str, Any]]:
    path = layout.table(name)
    if not path.is_file():
        raise InputError(path, f"no {name}.parquet: is this the OUT folder of a finished `phanes screen` run?")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise InputError(path, f"cannot read the table ({type(exc).__name__}: {exc})") from exc
    if "id" not in table.column_names or not pa.types.is_string(table.schema.field("id").type):
        raise InputError(path, "has no text id column: not a table written by `phanes screen`")
    if table.column("id").null_count:
        raise InputError(path, "has rows without an id")
    return table.to_pylist()


def _lesions(layout: OutputLayout, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The lesions.parquet rows of each id, by lesion_index (absent or damaged table: none; the views then open
    on the lesion mask's largest component). A run from before lesion locations has no location columns."""
    try:
        names = pq.read_schema(layout.table("lesions")).names
        wanted = [c for c in LESION_COLUMNS if c in names]
        rows = pq.read_table(layout.table("lesions"), columns=wanted).to_pylist()
    except Exception:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in sorted((r for r in rows if r.get("id") in ids), key=lambda r: r.get("lesion_index") or 0):
        out.setdefault(row["id"], []).append(row)
    return out


def location_html(volumes: list[dict[str, Any]]) -> str:
    """A small table: per location class, the cohort's burden and how many volumes have any ('' before locations)."""
    ok = [v for v in volumes if v.get("status") == "ok"]
    if not any(v.get(c) is not None for v in ok for c in LOCATION_BURDEN_COLUMNS.values()):
        return ""
    cells = []
    for place, column in LOCATION_BURDEN_COLUMNS.items():
        values = np.array([v[column] for v in ok if v.get(column) is not None], dtype=float)
        cells.append(f"<tr><th>{html.escape(place.replace('_', ' '))}</th><td>{values.sum():.2f}</td>"
                     f"<td>{int(np.count_nonzero(values > 0))}</td></tr>")
    return ('<table class="locations"><caption>Lesion burden by location (core.locations: from each brain\'s own '
            "tissue classes)</caption><tr><th>location</th><th>burden, mL (all volumes)</th>"
            f"<th>volumes with any</th></tr>{''.join(cells)}</table>")


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return value if value is None or isinstance(value, (int, str, bool)) else str(value)


def summary_figures(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the spread of burden over the volumes that were screened successfully."""
    ok = [v for v in volumes if v.get("status") == "ok"]
    burden = np.array([v["lesion_burden_ml"] for v in ok if v.get("lesion_burden_ml") is not None], dtype=float)
    q = np.percentile(burden, [25, 50, 75]) if burden.size else [math.nan] * 3
    return {"total": len(volumes), "screened": len(ok), "failed": len(volumes) - len(ok),
            "burden_median": float(q[1]), "burden_q1": float(q[0]), "burden_q3": float(q[2]),
            "burden_max": float(burden.max()) if burden.size else math.nan,
            "with_lesions": int(sum(1 for v in ok if (v.get("lesion_count") or 0) > 0))}


def _stems(volumes: list[dict[str, Any]]) -> dict[str, str | None]:
    """Each id's report file stem, unique within the report; None for an id that cannot name a file."""
    stems: dict[str, str | None] = {}
    taken: set[str] = set()
    for v in volumes:
        vid = v["id"]
        stem = safe_stem(vid)
        if stem is not None:
            base, n = stem, 2
            while stem.casefold() in taken:
                stem, n = f"{base}~{n}", n + 1
            taken.add(stem.casefold())
        stems[vid] = stem
    return stems


def select_ids(volumes: list[dict[str, Any]], top: int, ids: Sequence[str], max_pages: int
               ) -> tuple[list[str], list[str]]:
    """(ids with a figure on the cohort page: top N and asked; ids with a page: those and the flagged ones)."""
    known = {v["id"] for v in volumes}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise InputError(", ".join(unknown), "not an id of this run (see volumes.parquet)")
    ok = [v for v in volumes if v.get("status") == "ok"]
    ranked = sorted(ok, key=lambda v: -(v.get("lesion_burden_ml") or 0.0))
    figures = list(dict.fromkeys([v["id"] for v in ranked[:top]] + list(ids)))
    flagged = [v["id"] for v in ranked if v.get("qc_flags") and v["id"] not in figures][:max_pages]
    return figures, figures + flagged


@dataclass
class _Cases:
    """What the per-volume step produced: page links by id, the cohort page's figure blocks, the files."""

    links: dict[str, str] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)


def _one_case(layout: OutputLayout, row: dict[str, Any], stem: str, target: Path, lesions: list[dict[str, Any]],
              columns: list[str],
              result: ReportResult) -> str:
    """Figure and page of one volume; returns the figure as base64 PNG (the cohort page may show it too)."""
    folder = target.parent / REPORT_FOLDER
    arrays = load_case(layout, row, lesions[0].get("centroid_world_mm") if lesions else None)
    burden = row.get("lesion_burden_ml")
    figure = png_base64(render_case(arrays, f"{row['id']}   burden {burden if burden is not None else 0:.2f} mL"))
    # checked against the HTML file's folder, not report/ itself: report/ may be a link leading out of it
    result.figures.append(save_png(figure, inside(target.parent, folder / "figures" / f"{stem}.png")))
    page = inside(target.parent, folder / "volumes" / f"{stem}.html")
    shown = {c: _cell(row.get(c)) for c in columns}
    result.pages.append(write_case_page(page, target, layout, row, arrays, figure, shown, lesions))
    return figure


def _cases(layout: OutputLayout, volumes: list[dict[str, Any]], chosen: tuple[list[str], list[str]], target: Path,
           columns: list[str], result: ReportResult, progress: Callable[[str], None]) -> _Cases:
    """Write the figure and page of each chosen id; a volume that cannot be drawn is noted, not fatal."""
    figure_ids, page_ids = chosen
    by_id, stems = {v["id"]: v for v in volumes}, _stems(volumes)
    lesions = _lesions(layout, set(page_ids))
    out = _Cases()
    for n, vid in enumerate(page_ids, 1):
        stem = stems[vid]
        if stem is None:
            result.skipped.append((vid, "the id cannot name a file ('/', '\\', '.', '..', control, line-break or "
                                        "invisible characters)"))
            continue
        try:
            figure = _one_case(layout, by_id[vid], stem, target, lesions.get(vid, []), columns, result)
        except (InputError, OSError, ValueError, KeyError) as exc:  # a missing or damaged file costs its page only
            # (KeyError: a BIDS run's id without sub-<label> has no folder)
            result.skipped.append((vid, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        href = f"{REPORT_FOLDER}/volumes/{quote(stem)}.html"
        out.links[vid] = href
        if vid in figure_ids:
            out.blocks.append(f'<figure class="case"><a href="{html.escape(href)}"><img alt="{html.escape(vid)}" '
                              f'src="data:image/png;base64,{figure}"></a>'
                              f"<figcaption>{html.escape(vid)}</figcaption></figure>")
        progress(f"page {n}/{len(page_ids)}")
    return out


def _failure_rows(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return '<p id="no-failures">No volume failed.</p>'
    rows = "".join(f"<tr><td>{html.escape(str(f.get('id')))}</td><td>{html.escape(str(f.get('stage')))}</td>"
                   f"<td>{html.escape(str(f.get('error_type')))}</td><td>{html.escape(str(f.get('message')))}</td></tr>"
                   for f in failures)
    return (f'<table id="failures"><thead><tr><th>id</th><th>stage</th><th>error</th><th>message</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _skipped_html(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><code>{html.escape(vid)}</code>: {html.escape(reason)}</li>" for vid, reason in skipped)
    return f'<p class="missing">No page or figure for {len(skipped)} volumes:</p><ul id="skipped">{items}</ul>'


def _charts(volumes: list[dict[str, Any]], covariates: list[str]) -> str:
    ok = [v for v in volumes if v.get("status") == "ok"]
    charts = [histogram_svg([v.get("lesion_burden_ml") for v in ok], "Lesion burden", "lesion burden (mL)"),
              histogram_svg([float(v.get("lesion_count") or 0) for v in ok], "Lesion count",
                            "lesions per volume (count)")]
    charts += [burden_by_svg(ok, c) for c in covariates]
    return "".join(charts)


AGE_REFERENCE = ("The reference is this cohort itself, not normative data of healthy people: each volume is compared "
                 "with the other volumes of its age group in this run. A cohort of patients raises the reference, so "
                 "a flag means unusual for this cohort at that age, not abnormal.")


def _age_html(reading: AgeReading | None) -> str:
    """Burden against age: the scatter, the rule and reference in words, and the flagged volumes (nothing without
    an age column)."""
    if reading is None:
        return ""
    rule = (f"Age groups of about equal size ({len(reading.groups)}: "
            + ", ".join(f"{g.low:g} to {g.high:g} years, n={g.count}" for g in reading.groups)
            + f"). A volume is flagged when its burden is above its age group's median + {K_MAD:g} x MAD "
              f"(the median absolute deviation scaled by 1.4826, taken as at least {MIN_SPREAD_ML:g} mL).")
    rows = "".join(
        f"<tr><td>{html.escape(reading.ids[i])}</td><td>{reading.ages[i]:g}</td>"
        f"<td>{reading.burdens[i]:.2f}</td><td>{reading.groups[reading.group_of[i]].median_ml:.2f}</td>"
        f"<td>{reading.groups[reading.group_of[i]].limit_ml:.2f}</td></tr>" for i in reading.flagged)
    table = (f'<table id="age-flagged"><thead><tr><th>id</th><th>{html.escape(reading.column)}</th>'
             "<th>burden (mL)</th><th>group median (mL)</th><th>flagged above (mL)</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>" if rows else '<p id="age-none-flagged">No volume is far above its age '
                                                          "group.</p>")
    return (f'<h2>Burden against age</h2><div class="charts">{burden_by_age_svg(reading)}</div>'
            f'<p class="note" id="age-reference">{html.escape(AGE_REFERENCE)}</p>'
            f'<p class="note" id="age-rule">{html.escape(rule)}</p>{table}')


def _target(out: Path | None, layout: OutputLayout) -> Path:
    target = Path(out) if out is not None else layout.root / "report.html"
    if target.is_dir():
        raise InputError(target, "is a folder; --out takes the path of the HTML file to write")
    if target.suffix.lower() not in (".html", ".htm"):
        raise InputError(target, "--out must name an .html file (refusing to overwrite anything else)")
    return target


def render_report(run_dir: Path, out: Path | None = None, top: int = 10, ids: Sequence[str] = (),
                  max_pages: int = 200, progress: Callable[[str], None] = lambda line: None) -> ReportResult:
    """Write RUN_DIR/report.html (or `out`) and, under `<its folder>/report/`, the volume pages and PNG figures."""
    if top < 0 or max_pages < 0:
        raise InputError(str(min(top, max_pages)), "--top and --max-pages must be 0 or more")
    layout = OutputLayout(Path(run_dir))
    volumes, failures = _read_table(layout, "volumes"), _read_table(layout, "failures")
    target = _target(out, layout)
    covariates = categorical_columns(volumes, NOT_COVARIATES)
    columns = [c for c in TABLE_COLUMNS if any(c in v for v in volumes)] + covariates
    stats = summary_figures(volumes)
    result = ReportResult(html=target, volumes=len(volumes), failed=stats["failed"])
    cases = _cases(layout, volumes, select_ids(volumes, top, ids, max_pages), target, columns, result, progress)
    data = {"columns": columns, "rows": [[_cell(v.get(c)) for c in columns] for v in volumes],
            "links": [cases.links.get(v["id"]) for v in volumes], "storage_key": _storage_key(layout)}
    fields = {
        "TITLE": html.escape(f"phanes report: {layout.root.name}"),
        "SUMMARY": _summary_html(stats, layout) + location_html(volumes),
        "CHARTS": _charts(volumes, covariates),
        "AGE": _age_html(read_by_age(volumes)),
        "FAILURES": _failure_rows(failures),
        "SKIPPED": _skipped_html(result.skipped),
        "FIGURES": "".join(cases.blocks) or "<p>No figure requested.</p>",
        "DATA": json_for_script(data),
        "VERSION": html.escape(__version__),
    }
    template = resources.files("phanes_cli.cohort_report").joinpath("template.html").read_text(encoding="utf-8")
    write_text(target, fill(template, fields))
    return result


def _run_manifest(layout: OutputLayout) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        run = json.loads(layout.run_manifest.read_text())
        if isinstance(run, dict):
            return run
    return {}


def _storage_key(layout: OutputLayout) -> str:
    """Where the browser keeps this run's QC verdicts: one key per run folder and start time."""
    return f"phanes-qc:{layout.root.resolve()}:{_run_manifest(layout).get('started', '')}"


def _summary_html(stats: dict[str, Any], layout: OutputLayout) -> str:
    run = _run_manifest(layout)

    def fmt(x: float) -> str:
        return "n/a" if not math.isfinite(x) else f"{x:.2f}"

    items = [("volumes", "n-total", str(stats["total"])), ("screened", "n-screened", str(stats["screened"])),
             ("failed", "n-failed", str(stats["failed"])),
             ("with lesions", "n-with-lesions", str(stats["with_lesions"])),
             ("median burden (mL)", "burden-median", fmt(stats["burden_median"])),
             ("IQR (mL)", "burden-iqr", f"{fmt(stats['burden_q1'])} to {fmt(stats['burden_q3'])}"),
             ("max burden (mL)", "burden-max", fmt(stats["burden_max"]))]
    cells = "".join(f'<div class="stat"><span class="label">{label}</span><span id="{key}">{value}</span></div>'
                    for label, key, value in items)
    raw_bundle = run.get("bundle")
    bundle: dict[str, Any] = raw_bundle if isinstance(raw_bundle, dict) else {}
    raw_calibration = bundle.get("calibration")
    calibration: dict[str, Any] = raw_calibration if isinstance(raw_calibration, dict) else {}
    meta = (f"bundle {str(bundle.get('hash', ''))[:12]} · run {run.get('status', 'unknown')}"
            f" · started {run.get('started', '')}"
            f" · anomaly threshold {calibration.get('anomaly_threshold', 'n/a')}")
    return f'<div class="stats">{cells}</div><p class="meta">{html.escape(meta)}</p>'
