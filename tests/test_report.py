"""`phanes report`: the HTML page and QC figures, checked on real files and in a real headless Chromium.

The run folder is built on disk with the screening schemas and real NIfTI maps, so the report is tested
on exactly what it reads. Oracles (counts, medians, the top ids) are computed here with numpy/pyarrow.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from phanes_cli.cohort_report.cases import CaseArrays, load_case
from phanes_cli.cohort_report.figures import pick_slices
from phanes_cli.cohort_report.page import render_report
from phanes_cli.cohort_report.safe import fill, json_for_script, safe_stem
from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import (
    FAILURE_SCHEMA,
    LESION_SCHEMA,
    VOLUME_SCHEMA,
    table_from_rows,
    with_extra_columns,
)
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
    write_parquet(layout.table("volumes"), table_from_rows(volumes, with_extra_columns(VOLUME_SCHEMA, volumes)))
    write_parquet(layout.table("failures"), table_from_rows(failures, FAILURE_SCHEMA))
    write_json(layout.run_manifest, {"status": "finished", "started": "2026-01-01T00:00:00",
                                     "bundle": {"hash": "abc" * 10, "calibration": {}}})
    return layout.root


def test_report_summary_pages_figures_and_covariates(tmp_path: Path) -> None:
    sites = ["siteA", "siteB", "siteA", "siteB", "siteA"]
    flags: list[list[str]] = [[], ["skull_present"], [], [], []]
    out = make_run(tmp_path, extra={"site": sites, "subject": [f"s{i}" for i in range(5)], "qc_flags": flags})
    result = render_report(out, top=3, ids=["sub-000"])
    page = result.html.read_text()
    table = pq.read_table(out / "volumes.parquet").to_pandas()
    ok = table[table.status == "ok"]
    assert result.volumes == len(table) and result.failed == int((table.status != "ok").sum())
    assert f'id="n-screened">{len(ok)}<' in page and f'id="n-failed">{result.failed}<' in page
    assert f'id="burden-median">{np.median(ok.lesion_burden_ml):.2f}<' in page
    top = ok.sort_values("lesion_burden_ml", ascending=False).id.tolist()[:3]
    assert top == ["sub-004", "sub-003", "sub-002"]  # burden grows with the index; sub-001 is flagged
    assert sorted(p.stem for p in result.figures) == sorted([*top, "sub-000", "sub-001"])
    assert sorted(p.stem for p in result.pages) == sorted([*top, "sub-000", "sub-001"])
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
    assert "site" in data["columns"] and data["links"].count(None) == len(table) - 5
    assert [p.stem for p in render_report(out, top=1, max_pages=0).pages] == ["sub-004"]
    for html_page in [result.html, *result.pages]:  # self-contained: no element loads anything from a server
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html_page.read_text())


def test_report_survives_missing_maps_and_rejects_bad_arguments(tmp_path: Path) -> None:
    out = make_run(tmp_path, with_maps=False)
    result = render_report(out, top=2)
    assert result.figures == [] and result.pages == [] and len(result.skipped) == 2
    assert 'id="skipped"' in result.html.read_text()
    out = make_run(tmp_path / "grid", n_ok=2, n_failed=0)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), str(out / "maps" / "sub-001_anomaly.nii.gz"))
    result = render_report(out, top=2)
    assert [p.stem for p in result.pages] == ["sub-000"] and "grid" in dict(result.skipped)["sub-001"]
    small = tmp_path / "small_truth.nii.gz"  # a ground truth off the grid is noted on the page, which stays
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(small))
    out = make_run(tmp_path / "truth", n_ok=1, n_failed=0, extra={"lesion_mask": [str(small)]})
    page = render_report(out, top=1).pages[0].read_text()
    assert "ground truth not shown" in page and "small_truth.nii.gz" in page and 'id="show-truth"' not in page
    with pytest.raises(InputError, match="not an id of this run"):
        render_report(out, ids=["nobody"])
    with pytest.raises(InputError, match=r"volumes\.parquet"):
        render_report(tmp_path / "empty")
    with pytest.raises(InputError, match="html"):  # would have replaced the table with HTML
        render_report(out, out=out / "volumes.parquet")
    for ids in ([1, 2], ["a", None]):  # a tampered table: ids that are not text, or missing
        write_parquet(out / "volumes.parquet", pa.table({"id": ids, "status": ["ok", "ok"]}))
        with pytest.raises(InputError, match="id"):
            render_report(out)
    (out / "volumes.parquet").write_text("garbage")
    with pytest.raises(InputError, match="cannot read"):
        render_report(out)


def test_an_input_changed_since_the_screen_is_not_drawn_under_its_maps(tmp_path: Path) -> None:
    """input_sha256 (schema 4): the report draws a volume only over the very file its maps came from."""
    import hashlib

    paths = [tmp_path / "inputs" / f"case{i}.nii.gz" for i in range(2)]
    out = make_run(tmp_path, n_ok=2, n_failed=0, extra={"input_sha256": [None, None]})
    table = pq.read_table(out / "volumes.parquet").to_pylist()
    for row, path in zip(table, paths, strict=True):
        row["input_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_parquet(out / "volumes.parquet", table_from_rows(table, with_extra_columns(VOLUME_SCHEMA, table)))
    assert sorted(p.stem for p in render_report(out, top=2, out=tmp_path / "before.html").pages) == ["sub-000",
                                                                                                    "sub-001"]
    nib.save(nib.Nifti1Image(blob_volume((24, 28, 20), seed=9), np.diag([2.0, 2.0, 2.0, 1.0])), str(paths[1]))
    result = render_report(out, top=2, out=tmp_path / "after.html")
    assert [p.stem for p in result.pages] == ["sub-000"]
    assert "changed since it was screened" in dict(result.skipped)["sub-001"]


def test_slices_are_where_the_lesion_and_the_brain_are() -> None:
    brain = np.zeros((10, 10, 60), dtype=bool)
    brain[:, :, 20:40] = True  # the image extends further, empty
    lesion = np.zeros_like(brain)
    lesion[4, 4, 23] = lesion[4, 4, 31] = True
    chosen = pick_slices(brain, lesion, axis=2, count=6, centre=23)
    assert {23, 31} <= set(chosen) and len(chosen) == 6 and chosen == sorted(chosen)
    assert all(20 <= z < 40 for z in chosen)
    assert pick_slices(brain, lesion, axis=0, count=3, centre=4)[0] >= 0


def test_views_open_on_the_lesions_table_centroid(tmp_path: Path) -> None:
    out = make_run(tmp_path, n_ok=1, n_failed=0)
    row = pq.read_table(out / "volumes.parquet").to_pylist()[0]
    layout = OutputLayout(out)

    def world(case: CaseArrays) -> list[float]:  # the case is cropped to the brain: compare in mm
        return [float(v) for v in (case.affine @ np.array([*case.centre, 1.0]))[:3]]

    assert world(load_case(layout, row, [10.0, 30.0, 2.0])) == [10.0, 30.0, 2.0]  # 2 mm voxels, origin 0
    assert world(load_case(layout, row, [1e6, -1e6, float("nan")])) == [16.0, 22.0, 20.0]  # garbage: mask's centre
    off = load_case(layout, row, [1e6, -1e6, 0.0])  # off the grid: clipped to it (and to the brain's box)
    low = off.affine[:3, 3] / 2.0
    assert off.centre == (min(23 - int(low[0]), off.image.shape[0] - 1), 0, 0)
    lesions = [{"id": "sub-000", "lesion_index": 2, "centroid_world_mm": [0.0, 0.0, 0.0]},
               {"id": "sub-000", "lesion_index": 1, "centroid_world_mm": [10.0, 30.0, 2.0]}]
    write_parquet(layout.table("lesions"), table_from_rows(lesions, LESION_SCHEMA))
    page = render_report(out, top=1).pages[0].read_text()
    data = json.loads(re.search(r'id="case-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    on_lesion = load_case(layout, row, [10.0, 30.0, 2.0]).centre  # a voxel of the grid cropped to the brain
    assert data["centre_voxel"] == list(on_lesion) and data["centre_mm"] == [10.0, 30.0, 2.0]


def test_fill_is_one_pass_and_script_json_cannot_close_its_element() -> None:
    assert fill("@@A@@|@@B@@", {"A": "@@B@@", "B": "<b>"}) == "@@B@@|<b>"
    with pytest.raises(KeyError):
        fill("@@A@@", {})
    hostile = ["</script><script>x()</script>", "<!--", "a&b", "\u2028\u2029", "@@DATA@@"]
    text = json_for_script({"ids": hostile})
    assert not re.search("[<>&\u2028\u2029]", text) and json.loads(text) == {"ids": hostile}


def test_ids_from_a_tampered_table_write_nothing_outside_the_report(tmp_path: Path) -> None:
    ids = ["x/../../../escape", "/tmp/abs", "..", ".hidden/../../y", "back\\slash", "\u202eRTL", "line\u2028sep",
           "tab\tid", "ok"]
    out = make_run(tmp_path / "run", ids=ids, n_failed=0)
    before = set(tmp_path.rglob("*"))
    result = render_report(out, top=10)
    written = set(tmp_path.rglob("*")) - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not list(tmp_path.rglob("escape*")) and not Path("/tmp/abs.png").exists()
    assert [p.stem for p in result.pages] == ["ok"]
    assert sorted(vid for vid, _ in result.skipped) == sorted(ids[:-1])
    assert safe_stem(".hidden") not in (None, ".hidden")  # a leading dot is renamed, not refused


def test_links_in_a_received_run_folder_lead_no_write_or_read_outside_it(tmp_path: Path) -> None:
    """report/ a link to a folder outside, report/volumes/ one, a map a link to a file outside: no page,
    figure or read goes through them; the volume is listed as skipped instead."""
    outside = tmp_path / "outside"
    (outside / "pages").mkdir(parents=True)
    runs = [make_run(tmp_path / f"r{i}", n_ok=1, n_failed=0) for i in range(3)]
    (runs[0] / "report").symlink_to(outside, target_is_directory=True)
    (runs[1] / "report").mkdir()
    (runs[1] / "report" / "volumes").symlink_to(outside / "pages", target_is_directory=True)
    anomaly = OutputLayout(runs[2]).map_path("sub-000", "anomaly")
    shutil.move(anomaly, outside / "other_patient.nii.gz")
    anomaly.symlink_to(outside / "other_patient.nii.gz")
    for run in runs:
        result = render_report(run, top=1)
        assert result.pages == [] and [vid for vid, _ in result.skipped] == ["sub-000"], result.skipped
        assert "outside" in result.skipped[0][1]
    assert sorted(p.name for p in outside.rglob("*")) == ["other_patient.nii.gz", "pages"]


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


BROWSER = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                             reason="Debian chromium + chromium-driver are not installed")
SCREENSHOTS = Path("/tmp/phanes_report_screens")


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (software WebGL for the viewer), downloads into a known folder."""
    webdriver = pytest.importorskip("selenium.webdriver")
    folder = tmp_path_factory.mktemp("chrome")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={folder / 'profile'}", "--window-size=1280,1400"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(folder / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.downloads = folder / "downloads"
    SCREENSHOTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver: Any, page: Path) -> list[dict[str, Any]]:
    """Load a page; the SEVERE console entries it logged (a fresh log per page)."""
    driver.get_log("browser")
    driver.get(page.as_uri())
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _download(driver: Any, button: str, name: str) -> str:
    target = driver.downloads / name
    target.unlink(missing_ok=True)
    driver.find_element(By.ID, button).click()
    deadline = time.monotonic() + 20
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return target.read_bytes().decode("utf-8")  # bytes: the CSV's CRLF line ends are part of what is checked


HOSTILE_IDS = ["@@DATA@@", "<img src=x onerror=window.__pwned=1>", "</script><script>window.__pwned=1</script>",
               "\"'quoted'\" & <b>bold</b>", "line\u2028sep", "__proto__", "a#b?c%20d e"]


@BROWSER
def test_hostile_ids_run_no_script_and_show_as_text(chrome: Any, tmp_path: Path) -> None:
    sites = ["<svg onload=window.__pwned=1>", "b", "<svg onload=window.__pwned=1>", "b", "c", "c", "c"]
    out = make_run(tmp_path, ids=HOSTILE_IDS, n_failed=1, extra={"site": sites})
    result = render_report(out, top=10)
    assert _open(chrome, result.html) == []
    assert chrome.execute_script("return window.__pwned") is None
    cells = {td.get_attribute("textContent")
             for td in chrome.find_elements(By.CSS_SELECTOR, "#volumes tbody td:first-child")}
    assert cells == {*HOSTILE_IDS, "bad-0"}
    assert "<svg onload" in chrome.find_element(By.CSS_SELECTOR, ".chart:last-child").text  # the level, as text
    # an id holding "/" or a line separator cannot name a file: in the table, without a page
    assert len(result.pages) == sum("/" not in i and "\u2028" not in i for i in HOSTILE_IDS)
    links = [a.get_attribute("href") for a in chrome.find_elements(By.CSS_SELECTOR, "#volumes tbody a")]
    assert sorted(Path(url2pathname(urlparse(u).path)) for u in links) == sorted(result.pages)
    for page in [p for p in result.pages if p.stem in HOSTILE_IDS[:2]]:  # ids reach a page's title and table only
        _open(chrome, page)
        assert chrome.execute_script("return window.__pwned") is None
        title = chrome.find_element(By.ID, "case-title").get_attribute("textContent")
        assert title.removeprefix("phanes: ") in HOSTILE_IDS
    chrome.save_screenshot(str(SCREENSHOTS / "hostile_page.png"))


VIEWER_IDS = ["<img src=x onerror=window.__pwned=1>", "\"'q'\" & <b>", "brain \U0001f9e0", "__proto__",
              "a#b?c%20d e"]  # bidi overrides and line separators cannot name files: refused by check_id


@BROWSER
def test_viewer_pages_show_hostile_ids_and_values_as_text(chrome: Any, tmp_path: Path) -> None:
    """Every volume page of ids with markup, quotes, emoji and URL characters, beside hostile
    qc_flags and brain_mask_source values and an input file whose name holds quotes and brackets: no script
    runs, the title is the id, and the back link and file links lead to files that exist."""
    value = "<svg onload=window.__pwned=1>"
    n = len(VIEWER_IDS)
    out = make_run(tmp_path, ids=VIEWER_IDS, n_failed=0,
                   extra={"qc_flags": [[value]] * n, "brain_mask_source": [value] * n})
    table = pq.read_table(out / "volumes.parquet").to_pylist()
    odd = Path(table[0]["input_path"]).with_name("in \"'<b>.nii.gz")
    Path(table[0]["input_path"]).rename(odd)
    table[0]["input_path"] = str(odd)
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(out / "volumes.parquet")), out / "volumes.parquet")
    pages = render_report(out, top=n).pages
    titles = set()
    for page in pages:
        assert _open(chrome, page) == []
        assert chrome.execute_script("return window.__pwned") is None
        titles.add(chrome.find_element(By.ID, "case-title").get_attribute("textContent").removeprefix("phanes: "))
        assert value in chrome.find_element(By.CSS_SELECTOR, "table.metrics").text
        links = [a.get_attribute("href") for a in chrome.find_elements(By.CSS_SELECTOR, "#back, ul a")]
        assert len(links) >= 3 and all(Path(url2pathname(urlparse(u).path)).is_file() for u in links), links
    assert titles == set(VIEWER_IDS)


@BROWSER
def test_viewer_loads_opens_on_the_lesion_and_toggles_overlays(chrome: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    truth = tmp_path / "truth.nii.gz"
    mask = np.zeros((24, 28, 20), dtype=np.uint8)
    mask[7:10, 9:14, 8:12] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])), str(truth))
    out = make_run(tmp_path, n_ok=2, n_failed=0, extra={"lesion_mask": [str(truth), None]})
    page = next(p for p in render_report(out, top=2).pages if p.stem == "sub-000")
    assert _open(chrome, page) == []
    WebDriverWait(chrome, 60).until(lambda d: d.execute_script("return document.body.dataset.viewer") == "ready")
    assert [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"] == []
    boxes = chrome.find_elements(By.CSS_SELECTOR, "#toggles input")
    assert [b.get_attribute("id") for b in boxes] == ["show-anomaly", "show-lesion", "show-brain", "show-truth"]
    assert chrome.execute_script("return window.phanesViewer.volumes.length") == 5
    # sub-000's lesion is voxels x 8, y 10..12, z 9..10 on a 2 mm diagonal grid: centre (16, 22, 19) mm
    centre = chrome.execute_script("const v = window.phanesViewer; return v.frac2mm(v.scene.crosshairPos);")
    assert np.allclose(centre[:3], [16, 22, 19], atol=2.01)
    canvas = chrome.find_element(By.ID, "viewer")
    before = canvas.screenshot_as_png
    chrome.save_screenshot(str(SCREENSHOTS / "viewer.png"))
    chrome.find_element(By.ID, "show-lesion").click()
    assert chrome.execute_script("return window.phanesViewer.volumes[2].opacity") == 0
    time.sleep(0.5)
    assert canvas.screenshot_as_png != before
    chrome.find_element(By.ID, "show-lesion").click()
    assert chrome.execute_script("return window.phanesViewer.volumes[2].opacity") == pytest.approx(0.6)
    assert [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"] == []


@BROWSER
def test_index_table_links_csv_and_qc_export(chrome: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    out = make_run(tmp_path, n_ok=120, n_failed=3)
    result = render_report(out, top=3)
    assert _open(chrome, result.html) == []
    table = pq.read_table(out / "volumes.parquet").to_pandas()
    assert chrome.find_element(By.ID, "n-total").text == str(len(table))
    assert chrome.find_element(By.ID, "row-count").text == f"{len(table)} of {len(table)} volumes"
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")) == 100  # one page in the DOM
    header = [th.text for th in chrome.find_elements(By.CSS_SELECTOR, "#volumes th")]
    burden = header.index("lesion_burden_ml")
    chrome.find_elements(By.CSS_SELECTOR, "#volumes th")[burden].click()
    chrome.find_elements(By.CSS_SELECTOR, "#volumes th")[burden].click()  # descending
    first = chrome.find_element(By.CSS_SELECTOR, "#volumes tbody tr").find_elements(By.TAG_NAME, "td")
    assert float(first[burden].text) == pytest.approx(table.lesion_burden_ml.max(), abs=1e-4)
    links = [a.get_attribute("href") for a in chrome.find_elements(By.CSS_SELECTOR, "#volumes tbody a")]
    assert len(links) == 3 and all(Path(url2pathname(urlparse(u).path)).is_file() for u in links)
    chrome.save_screenshot(str(SCREENSHOTS / "index.png"))
    chrome.find_elements(By.CSS_SELECTOR, "#volumes th")[0].click()  # by id, ascending
    first_id = sorted(table.id)[0]
    Select(chrome.find_element(By.CSS_SELECTOR, "#volumes tbody tr td.qc select")).select_by_value("fail")
    note = chrome.find_element(By.CSS_SELECTOR, "#volumes tbody tr td.qc input")
    note.send_keys("motion, ghosting", Keys.TAB)
    csv_rows = list(csv.DictReader(io.StringIO(_download(chrome, "download-csv", "volumes.csv"))))
    assert [r["id"] for r in csv_rows] == sorted(table.id)
    ok = {r["id"]: float(r["lesion_burden_ml"]) for r in csv_rows if r["status"] == "ok"}
    assert ok == pytest.approx({r.id: round(r.lesion_burden_ml, 4) for r in table[table.status == "ok"].itertuples()})
    assert csv_rows[0]["qc"] == "fail" and csv_rows[0]["qc_note"] == "motion, ghosting"
    chrome.refresh()  # the verdicts live in localStorage: a reload keeps them
    expected = [{"id": first_id, "qc": "fail", "qc_note": "motion, ghosting"}]
    assert json.loads(_download(chrome, "export-qc-json", "qc.json")) == expected
    assert _download(chrome, "export-qc-csv", "qc.csv") == f'id,qc,qc_note\r\n{first_id},fail,"motion, ghosting"\r\n'
    assert chrome.find_element(By.ID, "qc-count").text.startswith("1 of")


@BROWSER
def test_index_of_ten_thousand_volumes_stays_fast(chrome: Any, tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "big")
    layout.ensure()
    rng = np.random.default_rng(1)
    rows = [{"id": f"sub-{i:05d}", "input_path": f"/data/sub-{i:05d}.nii.gz", "status": "ok", "lesion_count": 2,
             "lesion_burden_ml": float(b), "brain_volume_ml": 1200.0, "qc_flags": [], "site": f"s{i % 7}"}
            for i, b in enumerate(rng.gamma(1.5, 2.0, 10_000))]
    write_parquet(layout.table("volumes"), table_from_rows(rows, with_extra_columns(VOLUME_SCHEMA, rows)))
    write_parquet(layout.table("failures"), table_from_rows([], FAILURE_SCHEMA))
    start = time.perf_counter()
    result = render_report(layout.root, top=0)
    assert time.perf_counter() - start < 30 and result.html.stat().st_size < 5_000_000
    assert _open(chrome, result.html) == []
    assert chrome.find_element(By.ID, "row-count").text == "10000 of 10000 volumes"
    assert "Lesion burden by site" in chrome.page_source


def test_a_large_volume_gets_a_bounded_page_that_says_it_was_shown_coarser(tmp_path: Path) -> None:
    """A 9 M-voxel case whose brain fills its grid (cropping cannot help): the page embeds every layer on 2x2x2
    blocks (read back from the page: shape, voxel size, world position), stays small and says so."""
    import base64
    import gzip

    from phanes_cli.cohort_report.display import VOXEL_BUDGET

    shape, affine = (224, 224, 180), np.diag([0.7, 0.7, 0.7, 1.0])
    assert np.prod(shape) > VOXEL_BUDGET
    rng = np.random.default_rng(0)
    image = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    lesion = np.zeros(shape, dtype=np.uint8)
    lesion[100:104, 100:104, 90:92] = 1  # 32 voxels: still visible once shown on 2x2x2 blocks
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    files = {"input": tmp_path / "big.nii", "brain": tmp_path / "big_brain.nii"}
    for path, data in ((files["input"], image), (files["brain"], np.ones(shape, np.uint8)),
                       (layout.map_path("big", "anomaly"), lesion * np.float32(0.8)),
                       (layout.map_path("big", "lesion_mask"), lesion),
                       (layout.map_path("big", "pseudohealthy"), image)):
        nib.save(nib.Nifti1Image(data, affine), str(path))
    row = {"id": "big", "input_path": str(files["input"]), "brain_mask": str(files["brain"]), "status": "ok",
           "lesion_count": 1, "lesion_burden_ml": 0.011, "max_anomaly": 0.8, "qc_flags": []}
    write_parquet(layout.table("volumes"), table_from_rows([row], with_extra_columns(VOLUME_SCHEMA, [row])))
    write_parquet(layout.table("failures"), table_from_rows([], FAILURE_SCHEMA))
    write_json(layout.run_manifest, {"status": "finished", "bundle": {"hash": "abc", "calibration": {}}})
    (page,) = render_report(layout.root, ids=["big"]).pages
    text = page.read_text()
    assert page.stat().st_size < 20 * 2**20 and "2x2x2 blocks" in text and "224x224x180 -&gt; 112x112x90" in text
    data = json.loads(re.search(r'id="case-data">(.*?)</script>', text, re.S).group(1))  # type: ignore[union-attr]
    layers = {layer["key"]: nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(layer["data"])))
              for layer in data["layers"]}
    for key, shown in layers.items():
        assert shown.shape == (112, 112, 90) and np.allclose(shown.header.get_zooms(), 1.4), key
        assert np.allclose(shown.affine[:3, 3], 0.35), key  # the first 2x2x2 block's centre: voxel 0.5 at 0.7 mm
    assert int(np.asarray(layers["lesion"].dataobj).sum()) == 2 * 2 * 1  # the 4x4x2 lesion on 2x2x2 blocks
