"""The report's burden-against-age reading: a planted outlier is flagged against its own age group, the page
says the reference is the cohort itself, and cohorts without a usable age get no such section.

Run folders are written with the screening schemas (as test_report does); the expected flags are worked out
here from the cohort's construction, not from the code under test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from phanes_cli.cohort_report.age_groups import read_by_age
from phanes_cli.cohort_report.page import render_report
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import FAILURE_SCHEMA, VOLUME_SCHEMA, table_from_rows, with_extra_columns


def _run(root: Path, rows: list[dict[str, Any]]) -> Path:
    layout = OutputLayout(root / "out")
    layout.ensure()
    volumes = [{"status": "ok", "lesion_count": 1, "qc_flags": [], **row} for row in rows]
    volumes.append({"id": "broken", "status": "failed", "age": 50})  # a failed volume has no burden to read
    write_parquet(layout.table("volumes"), table_from_rows(volumes, with_extra_columns(VOLUME_SCHEMA, volumes)))
    write_parquet(layout.table("failures"), table_from_rows([], FAILURE_SCHEMA))
    write_json(layout.run_manifest, {"status": "finished", "started": "2026-01-01T00:00:00", "bundle": {}})
    return layout.root


def _ageing_cohort() -> list[dict[str, Any]]:
    """40 volumes aged 20 to 79 whose burden grows by 0.2 mL a year (small jitter), so the oldest carry ~12 mL."""
    rng = np.random.default_rng(3)
    ages = np.linspace(20, 79, 40).round()
    return [{"id": f"sub-{i:02d}", "age": int(a), "lesion_burden_ml": float(0.2 * (a - 20) + rng.uniform(0, 0.3))}
            for i, a in enumerate(ages)]


def test_a_planted_outlier_is_flagged_against_its_age_group_and_the_page_names_the_reference(tmp_path: Path) -> None:
    rows = _ageing_cohort()
    rows[3]["lesion_burden_ml"] = 9.0  # aged ~24: ordinary for a 65-year-old here, far above the young
    out = _run(tmp_path, rows)
    page = render_report(out, top=0, max_pages=0).html.read_text()
    reading = read_by_age([{"status": "ok", **r} for r in rows])
    assert reading is not None and [reading.ids[i] for i in reading.flagged] == ["sub-03"]
    # a single cohort-wide rule would not single it out: a third of the cohort carries more burden than it does
    assert sum(r["lesion_burden_ml"] > 9.0 for r in rows) >= 10
    assert "Burden against age" in page and "The reference is this cohort itself" in page
    assert "median + 3 x MAD" in page
    table = re.search(r'<table id="age-flagged">.*?</table>', page, re.S)
    assert table is not None and table.group(0).count("<tr>") == 2 and ">sub-03<" in table.group(0)
    flagged_points = re.findall(r'<circle class="flagged"[^>]*><title>([^:]+):', page)
    assert flagged_points == ["sub-03"]
    assert page.count('class="point"') == len(rows) - 1  # every other aged, screened volume is drawn; not the failed
    assert '<polyline class="trend"' in page and ">age (years)</text>" in page


def test_a_cohort_of_mostly_zero_burdens_flags_only_a_clear_excess(tmp_path: Path) -> None:
    rows = [{"id": f"s{i}", "participants_age": 30 + i, "lesion_burden_ml": 0.0} for i in range(12)]
    rows[2]["lesion_burden_ml"] = 0.4  # MAD is 0 here: without the 1 mL floor of the spread this would be flagged
    rows[7]["lesion_burden_ml"] = 6.0
    reading = read_by_age([{"status": "ok", **r} for r in rows])
    assert reading is not None and reading.column == "participants_age"
    assert [reading.ids[i] for i in reading.flagged] == ["s7"]
    assert all(g.limit_ml == 3.0 for g in reading.groups)  # median 0 + 3 x 1 mL


def test_no_age_reading_without_a_numeric_age_or_enough_volumes(tmp_path: Path) -> None:
    text_ages = [{"id": f"s{i}", "age": "40-49", "lesion_burden_ml": 1.0} for i in range(10)]
    page = render_report(_run(tmp_path / "a", text_ages), top=0, max_pages=0).html.read_text()
    assert "Burden against age" not in page and "reference is this cohort" not in page
    few = [{"id": f"s{i}", "age": 40 + i, "lesion_burden_ml": 1.0} for i in range(4)]
    assert read_by_age([{"status": "ok", **r} for r in few]) is None
    page = render_report(_run(tmp_path / "b", few), top=0, max_pages=0).html.read_text()
    assert "Burden against age" not in page
