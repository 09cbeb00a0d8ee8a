"""Rich tables of evaluation results, one row per method, laid out like the paper's Tables 1 and 2.

AUPRC and Dice are shown in percent as in the paper; undefined values (no lesions, no calibrated
threshold) show as a dash.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

DISPLAY_NAMES = {"phanes": "PHANES", "ra": "RA", "phanes-gt": "PHANES-GT", "residual": "Residual"}
_DASH = "-"


def _defined(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if _defined(value) else _DASH


def _pct_pm(mean: Any, std: Any) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if _defined(mean) and _defined(std) else _DASH


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _defined(value) else _DASH


def _pm(mean: Any, std: Any, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if _defined(mean) and _defined(std) else _DASH


def real_lesion_rich_table(methods: dict[str, dict[str, Any]], settings: dict[str, Any], source: str | None = None
                           ) -> Table:
    """Real-lesion results (paper Table 2 plus Dice at the calibrated threshold, detection and volume error)."""
    volumes = next(iter(methods.values()), {}).get("n_volumes") if source else settings.get("n_volumes")
    where = f"source {source!r}" if source else f"split {settings.get('split')!r}"
    table = Table(title=f"Real lesions: {where}, {volumes} volume(s), "
                        f"bundle {str(settings.get('bundle_hash', ''))[:12]}")
    for header in ("Method", "AUPRC %", "AUPRC/vol %", "[Dice] %", "Dice %", "Dice/vol %",
                   "Lesions found", "FP comp.", "|ΔV| mL", "median |ΔV| mL"):
        table.add_column(header, justify="left" if header == "Method" else "right")
    for method, s in methods.items():
        found = f"{s['lesions_found']}/{s['lesions_gt']}" if _defined(s.get("lesions_found")) else _DASH
        fp = str(s["fp_components"]) if _defined(s.get("fp_components")) else _DASH
        table.add_row(DISPLAY_NAMES.get(method, method), _pct(s.get("auprc")),
                      _pct_pm(s.get("auprc_mean"), s.get("auprc_std")),
                      _pct(s.get("best_dice")), _pct(s.get("dice")), _pct_pm(s.get("dice_mean"), s.get("dice_std")),
                      found, fp, _pm(s.get("abs_volume_error_ml_mean"), s.get("abs_volume_error_ml_std")),
                      _num(s.get("abs_volume_error_ml_median"), 1))
    return table


def _recall(bins: dict[str, Any] | None, name: str) -> str:
    entry = (bins or {}).get(name)
    return f"{entry['found']}/{entry['total']}" if entry and entry["total"] else _DASH


def controls_table(methods: dict[str, dict[str, Any]], source: str | None = None) -> Table:
    """False positives per healthy control volume (mean and median), and lesions found per size bin."""
    where = f" of source {source!r}" if source else ""
    table = Table(title=f"Healthy controls{where} (false positives per healthy volume) and lesions found by size")
    for header in ("Method", "Healthy vols", "FP comp./vol", "FP mL/vol", "median FP comp.", "median FP mL",
                   "Found <1 mL", "Found 1-10 mL", "Found >10 mL"):
        table.add_column(header, justify="left" if header == "Method" else "right")
    for method, s in methods.items():
        controls = s.get("healthy_controls") or {}
        bins = s.get("lesion_recall_by_size")
        table.add_row(DISPLAY_NAMES.get(method, method), str(controls.get("volumes", _DASH)),
                      _num(controls.get("fp_components_per_volume"), 1), _num(controls.get("fp_ml_per_volume"), 2),
                      _num(controls.get("fp_components_median"), 1), _num(controls.get("fp_ml_median"), 2),
                      _recall(bins, "<1 mL"), _recall(bins, "1-10 mL"), _recall(bins, ">10 mL"))
    return table


def synthetic_table(synthetic: dict[str, Any]) -> Table:
    """Synthetic sprites (paper Table 1): LPIPS of the pseudo-healthy image, AUPRC and [Dice]."""
    settings = synthetic.get("settings", {})
    table = Table(title=f"Synthetic anomalies: {settings.get('n_slices')} healthy slice(s) from split "
                        f"{settings.get('source_split')!r}, seed {settings.get('seed')}")
    for header in ("Method", "LPIPS healthy ↓", "LPIPS anomaly ↓", "AUPRC %", "[Dice] %", "Dice %"):
        table.add_column(header, justify="left" if header == "Method" else "right")
    for method, s in synthetic["methods"].items():
        table.add_row(DISPLAY_NAMES.get(method, method), _num(s.get("lpips_healthy")), _num(s.get("lpips_anomaly")),
                      _pct(s.get("auprc")), _pct(s.get("best_dice")), _pct(s.get("dice")))
    return table


def render_tables(methods: dict[str, dict[str, Any]], synthetic: dict[str, Any] | None,
                  settings: dict[str, Any], by_source: dict[str, dict[str, dict[str, Any]]] | None = None
                  ) -> list[Table]:
    """The real-lesion table, healthy controls and recall by size (pooled, then per source brain when there are
    several), then the synthetic one when the protocol ran."""
    tables = [real_lesion_rich_table(methods, settings)]
    if settings.get("healthy_controls") or any(s.get("lesion_recall_by_size") for s in methods.values()):
        tables.append(controls_table(methods))
    for source, per_method in (by_source or {}).items():
        tables += [real_lesion_rich_table(per_method, settings, source), controls_table(per_method, source)]
    if synthetic is not None:
        tables.append(synthetic_table(synthetic))
    return tables
