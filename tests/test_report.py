"""`phanes report`: the HTML page and QC figures, checked on real files and in a real headless Chromium.

The run folder is built on disk with the screening schemas and real NIfTI maps, so the report is tested
on exactly what it reads. Oracles (counts, medians, the top ids) are computed here with numpy/pyarrow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phanes_cli.cohort_report.figures import pick_slices
from phanes_cli.cohort_report.page import render_report
from phanes_cli.cohort_report.safe import fill, json_for_script, safe_stem
from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.screening.layout import OutputLayout
from phanes_cli.screening.schemas import FAILURE_SCHEMA, VOLUME_SCHEMA, table_from_rows, with_text_columns
from tests.conftest import blob_volume

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _write_case(layout: OutputLayout, root: Path, vid: str, i: int, rng: np.random.Generator, maps: bool
                ) -> dict[str, Any]:
    """One screened volume on disk: input, maps (anomaly, lesion mask, pseudo-healthy), its table row."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = blob_volume((24, 28, 20), seed=i)
    lesion = np.zeros(image.shape, dtype=bool)
    lesion[8:8 + i % 6 + 1, 10:13, 9:11] = True
    anomaly = (lesion * rng.uniform(0.5, 1.0, image.shape)).astype(np.float32)
    path = root / "inputs" / f"case{i}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    if maps:
        nib.save(nib.Nifti1Image(anomaly, affine), str(layout.map_path(vid, "anomaly")))
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), str(layout.map_path(vid, "lesion_mask")))
        nib.save(nib.Nifti1Image(np.where(lesion, 50.0, image).astype(np.float32), affine),
                 str(layout.map_path(vid, "pseudohealthy")))
    return {"id": vid, "input_path": str(path), "status": "ok", "lesion_count": 1,
            "lesion_burden_ml": float(lesion.sum()) * 0.008, "brain_volume_ml": float((image > 0).sum()) * 0.008,
            "largest_lesion_ml": float(lesion.sum()) * 0.008, "max_anomaly": float(anomaly.max()),
            "mean_anomaly": float(anomaly.mean()), "slices_processed": 20, "qc_flags": []}


def make_run(root: Path, n_ok: int = 5, n_failed: int = 2, with_maps: bool = True, seed: int = 0,
             ids: list[str] | None = None, extra: dict[str, list[Any]] | None = None) -> Path:
    """A finished-looking run: inputs, maps, tables (plus `extra` manifest columns, one value per ok volume)."""
    rng = np.random.default_rng(seed)
    layout = OutputLayout(root / "out")
    layout.ensure()
    names = ids if ids is not None else [f"sub-{i:03d}" for i in range(n_ok)]
    volumes, failures = [], []
    for i, vid in enumerate(names):
        row = _write_case(layout, root, vid, i, rng, with_maps and safe_stem(vid) is not None)
        volumes.append({**row, **{k: v[i] for k, v in (extra or {}).items()}})
    for j in range(n_failed):
        vid = f"bad-{j}"
        failures.append({"id": vid, "path": f"/nowhere/{vid}.nii.gz", "stage": "decode", "error_type": "InputError",
                         "message": f"file not found <{j}>", "retry_on_resume": False, "bundle_hash": "abc"})
        volumes.append({"id": vid, "input_path": f"/nowhere/{vid}.nii.gz", "status": "failed", "bundle_hash": "abc"})
    write_parquet(layout.table("volumes"), table_from_rows(volumes, with_text_columns(VOLUME_SCHEMA, volumes)))
    write_parquet(layout.table("failures"), table_from_rows(failures, FAILURE_SCHEMA))
    write_json(layout.run_manifest, {"status": "finished", "started": "2026-01-01T00:00:00",
                                     "bundle": {"hash": "abc" * 10, "calibration": {}}})
    return layout.root


def test_report_summary_pages_figures_and_covariates(tmp_path: Path) -> None:
    sites = ["siteA", "siteB", "siteA", "siteB", "siteA"]
    out = make_run(tmp_path, extra={"site": sites, "subject": [f"s{i}" for i in range(5)]})
    result = render_report(out, top=3, ids=["sub-000"])
    page = result.html.read_text()
    table = pq.read_table(out / "volumes.parquet").to_pandas()
    ok = table[table.status == "ok"]
    assert result.volumes == len(table) and result.failed == int((table.status != "ok").sum())
    assert f'id="n-screened">{len(ok)}<' in page and f'id="n-failed">{result.failed}<' in page
    assert f'id="burden-median">{np.median(ok.lesion_burden_ml):.2f}<' in page
    top = ok.sort_values("lesion_burden_ml", ascending=False).id.tolist()[:3]
    assert sorted(p.stem for p in result.figures) == sorted([*top, "sub-000"])
    assert sorted(p.stem for p in result.pages) == sorted([*top, "sub-000"])
    assert all(p.parent == out / "report" / "volumes" for p in result.pages)
    for png in result.figures:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 400
    assert page.count("data:image/png;base64,") == 4
    assert "file not found &lt;0&gt;" in page  # failure messages are shown, escaped
    assert "Lesion burden by site" in page and "(n=3)" in page and "(n=2)" in page  # 3 siteA, 2 siteB
    assert "by subject" not in page  # one volume per level: an identifier, not a grouping
    assert "lesion burden (mL)" in page and ">volumes</text>" in page  # axes are labelled
    data = json.loads(re.search(r'id="volume-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    assert "site" in data["columns"] and data["links"].count(None) == len(table) - 4
    for html_page in [result.html, *result.pages]:  # self-contained: no element loads anything from a server
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html_page.read_text())


def test_report_survives_missing_maps_and_rejects_bad_arguments(tmp_path: Path) -> None:
    out = make_run(tmp_path, with_maps=False)
    result = render_report(out, top=2)
    assert result.figures == [] and result.pages == [] and len(result.skipped) == 2
    assert 'id="skipped"' in result.html.read_text()
    with pytest.raises(InputError, match="not an id of this run"):
        render_report(out, ids=["nobody"])
    with pytest.raises(InputError, match=r"volumes\.parquet"):
        render_report(tmp_path / "empty")
    with pytest.raises(InputError, match="html"):  # would have replaced the table with HTML
        render_report(out, out=out / "volumes.parquet")
    (out / "volumes.parquet").write_text("garbage")
    with pytest.raises(InputError, match="cannot read"):
        render_report(out)


def test_slices_are_where_the_lesion_and_the_brain_are() -> None:
    brain = np.zeros((10, 10, 60), dtype=bool)
    brain[:, :, 20:40] = True  # the image extends further, empty
    lesion = np.zeros_like(brain)
    lesion[4, 4, 23] = lesion[4, 4, 31] = True
    chosen = pick_slices(brain, lesion, axis=2, count=6, centre=23)
    assert {23, 31} <= set(chosen) and len(chosen) == 6 and chosen == sorted(chosen)
    assert all(20 <= z < 40 for z in chosen)
    assert pick_slices(brain, lesion, axis=0, count=3, centre=4)[0] >= 0


def test_fill_is_one_pass_and_script_json_cannot_close_its_element() -> None:
    assert fill("@@A@@|@@B@@", {"A": "@@B@@", "B": "<b>"}) == "@@B@@|<b>"
    with pytest.raises(KeyError):
        fill("@@A@@", {})
    hostile = ["</script><script>x()</script>", "<!--", "a&b", "\u2028\u2029", "@@DATA@@"]
    text = json_for_script({"ids": hostile})
    assert not re.search("[<>&\u2028\u2029]", text) and json.loads(text) == {"ids": hostile}


def test_ids_from_a_tampered_table_write_nothing_outside_the_report(tmp_path: Path) -> None:
    ids = ["x/../../../escape", "/tmp/abs", "..", ".hidden/../../y", "back\\slash", "ok"]
    out = make_run(tmp_path / "run", ids=ids, n_failed=0)
    before = {p for p in tmp_path.rglob("*")}
    result = render_report(out, top=10)
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not list(tmp_path.rglob("escape*")) and not Path("/tmp/abs.png").exists()
    assert [p.stem for p in result.pages] == ["ok"]
    assert sorted(vid for vid, _ in result.skipped) == sorted(ids[:-1])
    assert safe_stem(".hidden") not in (None, ".hidden")  # a leading dot is renamed, not refused


def test_report_cli_writes_to_out_and_exit_codes(tmp_path: Path) -> None:
    out = make_run(tmp_path, n_ok=2, n_failed=0)
    target = tmp_path / "elsewhere" / "r.html"
    command = [sys.executable, "-m", "phanes_cli.cli", "report", str(out), "--out", str(target), "--top", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (target.parent / "report" / "volumes").is_dir() and len(list((target.parent / "report").rglob("*"))) == 4
    bad = subprocess.run([sys.executable, "-m", "phanes_cli.cli", "report", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
