"""`phanes report`: one self-contained HTML page for a screening run (no server, no CDN, images inline).

The page holds the cohort summary, histograms of burden and lesion counts (inline SVG), a per-volume
table that sorts, filters and pages in the browser (the rows travel as embedded JSON, so 10,000 rows
stay fast: only one page is in the DOM), the failures with their messages, and a QC figure for the
top-N volumes by burden plus any ids asked for; each figure is also written as `figures/<id>.png`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from phanes_cli import __version__
from phanes_cli.cohort_report.figures import CaseArrays, render_case, save_png
from phanes_cli.core.volume_io import load_volume
from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_text
from phanes_cli.screening.layout import OutputLayout

TABLE_COLUMNS = ("id", "status", "lesion_burden_ml", "lesion_count", "largest_lesion_ml", "brain_volume_ml",
                 "lesion_burden_fraction", "max_anomaly", "mean_anomaly", "slices_processed", "qc_flags", "runtime_s")


@dataclass(frozen=True)
class ReportResult:
    """What `render_report` wrote."""

    html: Path
    figures: list[Path]
    volumes: int
    failed: int


def _read_table(layout: OutputLayout, name: str) -> list[dict[str, Any]]:
    path = layout.table(name)
    if not path.is_file():
        raise InputError(path, f"no {name}.parquet: is this the OUT folder of a finished `phanes screen` run?")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise InputError(path, f"cannot read the table ({type(exc).__name__}: {exc})") from exc


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return value


def summary_figures(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the spread of burden over the volumes that were screened successfully."""
    ok = [v for v in volumes if v.get("status") == "ok"]
    burden = np.array([v["lesion_burden_ml"] for v in ok if v.get("lesion_burden_ml") is not None], dtype=float)
    q = np.percentile(burden, [25, 50, 75]) if burden.size else [math.nan] * 3
    return {"total": len(volumes), "screened": len(ok), "failed": len(volumes) - len(ok),
            "burden_median": float(q[1]), "burden_q1": float(q[0]), "burden_q3": float(q[2]),
            "burden_max": float(burden.max()) if burden.size else math.nan,
            "with_lesions": int(sum(1 for v in ok if (v.get("lesion_count") or 0) > 0))}


def histogram_svg(values: Sequence[float | None], title: str, unit: str, bins: int = 20) -> str:
    """An inline SVG bar histogram with its axis range and counts in tooltips."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    width, height, pad = 360, 160, 28
    if data.size == 0:
        return f'<figure class="hist"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    low, high = float(data.min()), float(data.max())
    counts, edges = np.histogram(data, bins=bins, range=(low, high if high > low else low + 1))
    top = max(int(counts.max()), 1)
    bar_w = (width - 2 * pad) / bins
    bars = []
    for i, n in enumerate(counts):
        h = (height - 2 * pad) * n / top
        bars.append(f'<rect x="{pad + i * bar_w:.1f}" y="{height - pad - h:.1f}" width="{bar_w - 1:.1f}" '
                    f'height="{h:.1f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g} {unit}: {n}</title></rect>')
    axis = (f'<text x="{pad}" y="{height - 8}">{low:.3g}</text>'
            f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{high:.3g} {html.escape(unit)}</text>'
            f'<text x="4" y="{pad - 8}">{top} max</text>')
    return (f'<figure class="hist"><svg viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
            f'{"".join(bars)}{axis}</svg><figcaption>{html.escape(title)} (n = {data.size})</figcaption></figure>')


def _case_arrays(layout: OutputLayout, row: dict[str, Any]) -> CaseArrays:
    vid = row["id"]
    image = load_volume(row["input_path"])
    anomaly = load_volume(layout.map_path(vid, "anomaly")).data
    lesion = load_volume(layout.map_path(vid, "lesion_mask")).data > 0
    pseudo_path = layout.map_path(vid, "pseudohealthy")
    pseudo = load_volume(pseudo_path).data if pseudo_path.is_file() else None
    return CaseArrays(image=image.data, anomaly=anomaly, lesion=lesion, pseudo_healthy=pseudo)


def _figure_ids(volumes: list[dict[str, Any]], top: int, ids: Sequence[str]) -> list[str]:
    known = {v["id"] for v in volumes}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise InputError(", ".join(unknown), "not an id of this run (see volumes.parquet)")
    ok = sorted((v for v in volumes if v.get("status") == "ok"), key=lambda v: -(v.get("lesion_burden_ml") or 0.0))
    chosen = [v["id"] for v in ok[:top]]
    return chosen + [i for i in ids if i not in chosen]


def _figures(layout: OutputLayout, volumes: list[dict[str, Any]], ids: list[str], folder: Path
             ) -> tuple[list[str], list[Path]]:
    """Render each figure to PNG; returns the HTML blocks (image inline) and the files written."""
    by_id = {v["id"]: v for v in volumes}
    blocks, paths = [], []
    for vid in ids:
        row = by_id[vid]
        try:
            image = render_case(_case_arrays(layout, row), f"{vid}  burden {row.get('lesion_burden_ml') or 0:.2f} mL")
        except Exception as exc:  # a missing or damaged map must not cost the whole report
            blocks.append(f'<p class="missing">{html.escape(vid)}: no figure ({html.escape(type(exc).__name__)}: '
                          f'{html.escape(str(exc).splitlines()[0] if str(exc) else "")})</p>')
            continue
        paths.append(save_png(image, folder / f"{vid}.png"))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        blocks.append(f'<figure class="case" id="case-{html.escape(vid)}"><img alt="{html.escape(vid)}" '
                      f'src="data:image/png;base64,{data}"><figcaption>{html.escape(vid)}</figcaption></figure>')
    return blocks, paths


def _failure_rows(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return '<p id="no-failures">No volume failed.</p>'
    rows = "".join(f"<tr><td>{html.escape(str(f.get('id')))}</td><td>{html.escape(str(f.get('stage')))}</td>"
                   f"<td>{html.escape(str(f.get('error_type')))}</td><td>{html.escape(str(f.get('message')))}</td></tr>"
                   for f in failures)
    return (f'<table id="failures"><thead><tr><th>id</th><th>stage</th><th>error</th><th>message</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _json_for_script(payload: Any) -> str:
    """JSON safe inside <script>: no '</' sequence can close the element early."""
    return json.dumps(payload, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_report(run_dir: Path, out: Path | None = None, top: int = 10, ids: Sequence[str] = ()) -> ReportResult:
    """Write RUN_DIR/report.html (or `out`) and a PNG per figure under `<out folder>/report/figures/`."""
    if top < 0:
        raise InputError(str(top), "--top must be 0 or more")
    layout = OutputLayout(Path(run_dir))
    volumes, failures = _read_table(layout, "volumes"), _read_table(layout, "failures")
    target = Path(out) if out is not None else layout.root / "report.html"
    if target.is_dir():
        raise InputError(target, "is a folder; --out takes the path of the HTML file to write")
    columns = [c for c in TABLE_COLUMNS if any(c in v for v in volumes)]
    rows = [[_cell(v.get(c)) for c in columns] for v in volumes]
    blocks, pngs = _figures(layout, volumes, _figure_ids(volumes, top, ids), target.parent / "report" / "figures")
    stats = summary_figures(volumes)
    ok = [v for v in volumes if v.get("status") == "ok"]
    page = resources.files("phanes_cli.cohort_report").joinpath("template.html").read_text(encoding="utf-8")
    fields = {
        "TITLE": html.escape(f"phanes report: {layout.root.name}"),
        "SUMMARY": _summary_html(stats, layout),
        "HISTOGRAMS": histogram_svg([v.get("lesion_burden_ml") for v in ok], "Lesion burden", "mL")
        + histogram_svg([float(v.get("lesion_count") or 0) for v in ok], "Lesion count", "lesions"),
        "FAILURES": _failure_rows(failures),
        "FIGURES": "".join(blocks) or "<p>No figure requested.</p>",
        "DATA": _json_for_script({"columns": columns, "rows": rows}),
        "VERSION": html.escape(__version__),
    }
    for key, value in fields.items():
        page = page.replace(f"@@{key}@@", value)
    write_text(target, page)
    return ReportResult(html=target, figures=pngs, volumes=len(volumes), failed=stats["failed"])


def _summary_html(stats: dict[str, Any], layout: OutputLayout) -> str:
    run: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        run = json.loads(layout.run_manifest.read_text())

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
    calibration = bundle.get("calibration") or {}
    meta = (f"bundle {str(bundle.get('hash', ''))[:12]} · run {run.get('status', 'unknown')}"
            f" · started {run.get('started', '')}"
            f" · anomaly threshold {calibration.get('anomaly_threshold', 'n/a')}")
    return f'<div class="stats">{cells}</div><p class="meta">{html.escape(meta)}</p>'
