"""`phanes report`: the HTML page and QC figures, checked on real files and in a real headless Chromium.

The run folder is built on disk with the screening schemas and real NIfTI maps, so the report is tested
on exactly what it reads. Oracles (counts, medians, the top ids) are computed here with numpy/pyarrow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phanes_cli.cohort_report.figures import pick_slices
from phanes_cli.cohort_report.page import render_report
from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.screening.layout import OutputLayout
from phanes_cli.screening.schemas import FAILURE_SCHEMA, VOLUME_SCHEMA, table_from_rows
from tests.conftest import blob_volume

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def make_run(root: Path, n_ok: int = 5, n_failed: int = 2, with_maps: bool = True, seed: int = 0) -> Path:
    """A finished-looking run: inputs, maps (anomaly, lesion mask, pseudo-healthy), tables, run.json."""
    rng = np.random.default_rng(seed)
    layout = OutputLayout(root / "out")
    layout.ensure()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    volumes, failures = [], []
    for i in range(n_ok):
        vid = f"sub-{i:03d}"
        image = blob_volume((24, 28, 20), seed=i)
        lesion = np.zeros(image.shape, dtype=bool)
        lesion[8:8 + i + 1, 10:13, 9:11] = True
        anomaly = (lesion * rng.uniform(0.5, 1.0, image.shape)).astype(np.float32)
        path = root / "inputs" / f"{vid}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), str(path))
        if with_maps:
            nib.save(nib.Nifti1Image(anomaly, affine), str(layout.map_path(vid, "anomaly")))
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), str(layout.map_path(vid, "lesion_mask")))
            nib.save(nib.Nifti1Image(np.where(lesion, 50.0, image).astype(np.float32), affine),
                     str(layout.map_path(vid, "pseudohealthy")))
        volumes.append({"id": vid, "input_path": str(path), "status": "ok", "lesion_count": 1,
                        "lesion_burden_ml": float(lesion.sum()) * 0.008,
                        "brain_volume_ml": float((image > 0).sum()) * 0.008,
                        "largest_lesion_ml": float(lesion.sum()) * 0.008, "max_anomaly": float(anomaly.max()),
                        "mean_anomaly": float(anomaly.mean()), "slices_processed": 20})
    for j in range(n_failed):
        vid = f"bad-{j}"
        failures.append({"id": vid, "path": f"/nowhere/{vid}.nii.gz", "stage": "decode", "error_type": "InputError",
                         "message": f"file not found <{j}>", "retry_on_resume": False, "bundle_hash": "abc"})
        volumes.append({"id": vid, "input_path": f"/nowhere/{vid}.nii.gz", "status": "failed", "bundle_hash": "abc"})
    write_parquet(layout.table("volumes"), table_from_rows(volumes, VOLUME_SCHEMA))
    write_parquet(layout.table("failures"), table_from_rows(failures, FAILURE_SCHEMA))
    write_json(layout.run_manifest, {"status": "finished", "bundle": {"hash": "abc" * 10, "calibration": {}}})
    return layout.root


def test_report_summary_figures_and_pngs(tmp_path: Path) -> None:
    out = make_run(tmp_path)
    result = render_report(out, top=3, ids=["sub-000"])
    page = result.html.read_text()
    table = pq.read_table(out / "volumes.parquet").to_pandas()
    ok = table[table.status == "ok"]
    assert result.volumes == len(table) and result.failed == int((table.status != "ok").sum())
    assert f'id="n-screened">{len(ok)}<' in page and f'id="n-failed">{result.failed}<' in page
    assert f'id="burden-median">{np.median(ok.lesion_burden_ml):.2f}<' in page
    top = ok.sort_values("lesion_burden_ml", ascending=False).id.tolist()[:3]
    assert sorted(p.stem for p in result.figures) == sorted([*top, "sub-000"])
    for png in result.figures:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert page.count("data:image/png;base64,") == 4
    assert "file not found &lt;0&gt;" in page  # failure messages are shown, escaped
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def test_report_survives_missing_maps_and_rejects_bad_arguments(tmp_path: Path) -> None:
    out = make_run(tmp_path, with_maps=False)
    result = render_report(out, top=2)
    assert result.figures == [] and "no figure" in result.html.read_text()
    with pytest.raises(InputError, match="not an id of this run"):
        render_report(out, ids=["nobody"])
    with pytest.raises(InputError, match=r"volumes\.parquet"):
        render_report(tmp_path / "empty")
    (out / "volumes.parquet").write_text("garbage")
    with pytest.raises(InputError, match="cannot read"):
        render_report(out)


def test_slice_choice_includes_the_lesion_slice() -> None:
    image = np.ones((10, 10, 40), dtype=np.float32)
    lesion = np.zeros_like(image, dtype=bool)
    lesion[4, 4, 23] = True
    chosen = pick_slices(image, lesion, 6)
    assert 23 in chosen and len(chosen) == 6 and chosen == sorted(chosen)


def test_report_cli_writes_to_out_and_exit_codes(tmp_path: Path) -> None:
    out = make_run(tmp_path, n_ok=2, n_failed=0)
    target = tmp_path / "elsewhere" / "r.html"
    command = [sys.executable, "-m", "phanes_cli.cli", "report", str(out), "--out", str(target), "--top", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert target.is_file() and (target.parent / "report" / "figures").is_dir()
    bad = subprocess.run([sys.executable, "-m", "phanes_cli.cli", "report", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium + chromium-driver are not installed")
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    out = make_run(tmp_path, n_ok=120, n_failed=3)
    page = render_report(out, top=1).html
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        table = pq.read_table(out / "volumes.parquet").to_pandas()
        assert driver.find_element(By.ID, "n-total").text == str(len(table))
        assert driver.find_element(By.ID, "n-failed").text == str(int((table.status != "ok").sum()))
        assert driver.find_element(By.ID, "row-count").text == f"{len(table)} of {len(table)} volumes"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")) == 100  # one page in the DOM
        header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#volumes th")]
        burden = header.index("lesion_burden_ml")
        driver.find_elements(By.CSS_SELECTOR, "#volumes th")[burden].click()
        driver.find_elements(By.CSS_SELECTOR, "#volumes th")[burden].click()  # descending
        first = driver.find_element(By.CSS_SELECTOR, "#volumes tbody tr").find_elements(By.TAG_NAME, "td")
        assert float(first[burden].text) == pytest.approx(table.lesion_burden_ml.max(), abs=1e-4)
        driver.find_elements(By.CSS_SELECTOR, "#volumes th")[0].click()  # by id, ascending
        first = driver.find_element(By.CSS_SELECTOR, "#volumes tbody tr").find_elements(By.TAG_NAME, "td")
        assert first[0].text == sorted(table.id)[0]
        box = driver.find_element(By.ID, "filter")
        box.send_keys("failed")
        assert driver.find_element(By.ID, "row-count").text == f"3 of {len(table)} volumes"
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
        assert json.loads(driver.find_element(By.ID, "volume-data").get_attribute("textContent"))["rows"]
    finally:
        driver.quit()
