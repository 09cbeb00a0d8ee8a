"""`phanes stats` and the screening tables it shares, on real `phanes screen` runs (shared Ray head, tiny networks).

Oracles are recomputed here from the written NIfTI maps with numpy and `scipy.ndimage.label` (full
connectivity, the screening rule), never through the code under test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from phanes_cli import __version__
from phanes_cli.cli import app
from phanes_cli.core.bundle import load_bundle
from phanes_cli.errors import ConfigError, InputError
from phanes_cli.run_folder.schemas import SCHEMA_VERSION
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.restat import run_stats
from tests._ray import HEAD_IP, RayCluster
from tests.test_screening import affines, write_head

SCREENING_ONLY = ["runtime_s", "decode_s", "brain_mask_s", "inference_s", "write_s", "decode_node", "inference_node",
                  "write_node"]


def oracle(anomaly_file: Path, threshold: float, min_ml: float) -> tuple[np.ndarray, list[int], float]:
    """(mask, component voxel counts, voxel mL) from a written map: s >= t where s > 0, small parts dropped."""
    img = nib.load(str(anomaly_file))
    score = np.asarray(img.dataobj, dtype=np.float32)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    labels, n = ndimage.label((score >= threshold) & (score > 0), structure=np.ones((3, 3, 3), bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts * voxel_ml >= min_ml
    keep[0] = False
    return keep[labels], sorted((int(c) for c in counts[keep]), reverse=True), voxel_ml


@pytest.fixture(scope="module")
def runs(ray_head: RayCluster, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two screens of one cohort (a CSV list with subject/site columns and one missing file) in one Ray session:
    at the bundle's calibration, and with a minimum lesion size chosen from the first run's lesions."""
    import ray

    root = tmp_path_factory.mktemp("stats")
    bundle = tiny_bundle
    names = ["ras", "permuted", "aniso"]
    paths = {n: write_head(root / "in" / f"{n}.nii.gz", affines()[n], seed=i) for i, n in enumerate(names)}
    listing = root / "cohort.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "subject", "site", "status"])
        for i, n in enumerate(names):
            writer.writerow([n, str(paths[n]), f"00{i}", "A" if i else "B", "x"])
        writer.writerow(["gone", str(root / "in" / "gone.nii.gz"), "009", "C", "y"])
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=ray_head.address, log_to_driver=False, _node_ip_address=HEAD_IP)
    try:
        first = root / "out"
        screen([str(listing)], ScreenOptions(bundle=bundle, out=first, quiet=True, num_actors=1, node_ip=HEAD_IP))
        sizes = pd.read_parquet(first / "lesions.parquet")["volume_ml"]
        min_ml = float(np.sort(sizes.unique())[len(sizes.unique()) // 2])  # drops about half the components
        second = root / "out_min"
        screen([str(listing)], ScreenOptions(bundle=bundle, out=second, quiet=True, num_actors=1, node_ip=HEAD_IP,
                                             min_lesion_ml=min_ml))
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
    return {"bundle": bundle, "first": first, "second": second, "min_ml": min_ml, "names": names}


def test_screening_tables_flat_columns_manifest_columns_and_metadata(runs: dict) -> None:
    out = runs["first"]
    calibration = load_bundle(runs["bundle"]).require_calibration()
    volumes = pd.read_parquet(out / "volumes.parquet").set_index("id")
    lesions = pd.read_parquet(out / "lesions.parquet")
    failures = pd.read_parquet(out / "failures.parquet").set_index("id")
    assert list(volumes.index) == ["aniso", "gone", "permuted", "ras"]
    # manifest columns carried through as text; one that clashes with a table column gets `input_`
    assert volumes.loc["ras", "subject"] == "000" and volumes.loc["permuted", "site"] == "A"
    assert volumes.loc["gone", "subject"] == "009" and failures.loc["gone", "site"] == "C"
    assert volumes.loc["ras", "input_status"] == "x" and volumes.loc["ras", "status"] == "ok"
    ok = volumes[volumes["status"] == "ok"]
    for i, axis in enumerate("xyz"):
        assert (ok[f"shape_{axis}"] == ok["shape"].map(lambda s, i=i: s[i])).all()
        assert (ok[f"voxel_mm_{axis}"] == ok["voxel_size_mm"].map(lambda s, i=i: s[i])).all()
        assert (lesions[f"centroid_{axis}_mm"] == lesions["centroid_world_mm"].map(lambda c, i=i: c[i])).all()
    assert tuple(ok.loc["aniso", ["voxel_mm_x", "voxel_mm_y", "voxel_mm_z"]]) == (1.5, 2.0, 3.0)
    assert set(lesions["id"]) <= set(ok.index)
    np.testing.assert_allclose(ok["lesion_burden_fraction"], ok["lesion_burden_ml"] / ok["brain_volume_ml"])
    assert (ok["anomaly_threshold"] == calibration.anomaly_threshold).all()
    assert (ok["mask_threshold"] == calibration.mask_threshold).all() and (ok["min_lesion_ml"] == 0).all()
    assert volumes.loc["gone", ["lesion_burden_ml", "lesion_count", "shape_x", "anomaly_threshold"]].isna().all()
    meta = pq.read_schema(out / "lesions.parquet").metadata
    assert meta[b"phanes.schema_version"] == SCHEMA_VERSION.encode() and meta[b"phanes.version"] == __version__.encode()
    assert meta[b"phanes.bundle_hash"].decode() == load_bundle(runs["bundle"]).hash
    assert json.loads(meta[b"phanes.thresholds"])["anomaly_threshold"] == calibration.anomaly_threshold
    assert "*_ml" in json.loads(meta[b"phanes.units"])
    assert pq.read_schema(out / "volumes.parquet").metadata == meta


def test_screening_min_lesion_size_matches_the_oracle_and_stats(runs: dict, tmp_path: Path) -> None:
    out, min_ml = runs["second"], runs["min_ml"]
    threshold = load_bundle(runs["bundle"]).require_calibration().anomaly_threshold
    volumes = pd.read_parquet(out / "volumes.parquet").set_index("id")
    assert (volumes.loc[runs["names"], "min_lesion_ml"] == min_ml).all()
    unfiltered = pd.read_parquet(runs["first"] / "volumes.parquet").set_index("id").loc[runs["names"], "lesion_count"]
    assert 0 < volumes.loc[runs["names"], "lesion_count"].sum() < unfiltered.sum()  # some components were dropped
    assert json.loads((out / "run.json").read_text())["bundle"]["calibration"]["min_lesion_ml"] == min_ml
    for vid in runs["names"]:
        mask, counts, voxel_ml = oracle(out / "maps" / f"{vid}_anomaly.nii.gz", threshold, min_ml)
        written = np.asarray(nib.load(str(out / "maps" / f"{vid}_lesionmask.nii.gz")).dataobj) > 0
        np.testing.assert_array_equal(written, mask)
        assert volumes.loc[vid, "lesion_count"] == len(counts)
        assert volumes.loc[vid, "lesion_burden_ml"] == pytest.approx(sum(counts) * voxel_ml)
    # `phanes stats` on the run without a minimum size, at the same minimum, gives the screened tables
    result = run_stats(runs["first"], tmp_path / "s", min_lesion_ml=min_ml)
    again = pd.read_parquet(result.tables["volumes"]).set_index("id")
    screened = volumes.drop(columns=SCREENING_ONLY)
    pd.testing.assert_frame_equal(again.drop(columns=SCREENING_ONLY)[screened.columns], screened)
    pd.testing.assert_frame_equal(pd.read_parquet(result.tables["lesions"]), pd.read_parquet(out / "lesions.parquet"))


def test_stats_new_threshold_against_the_oracle(runs: dict, tmp_path: Path) -> None:
    first = runs["first"]
    positive = np.concatenate([np.asarray(nib.load(str(first / "maps" / f"{n}_anomaly.nii.gz")).dataobj).ravel()
                               for n in runs["names"]])
    threshold = float(np.quantile(positive[positive > 0], 0.95))
    min_ml = 0.02
    result = run_stats(first, tmp_path / "new", threshold=threshold, min_lesion_ml=min_ml)
    assert (result.volumes, result.failed) == (4, 1)
    volumes = pd.read_parquet(result.tables["volumes"]).set_index("id")
    lesions = pd.read_parquet(result.tables["lesions"])
    for vid in runs["names"]:
        mask, counts, voxel_ml = oracle(first / "maps" / f"{vid}_anomaly.nii.gz", threshold, min_ml)
        written = np.asarray(nib.load(str(tmp_path / "new" / "maps" / f"{vid}_lesionmask.nii.gz")).dataobj) > 0
        np.testing.assert_array_equal(written, mask)
        row = volumes.loc[vid]
        sizes = np.array(counts) * voxel_ml
        assert row["lesion_count"] == len(counts)
        assert lesions.loc[lesions["id"] == vid, "voxel_count"].tolist() == counts
        assert row["lesion_burden_ml"] == pytest.approx(sizes.sum())
        assert row["largest_lesion_ml"] == pytest.approx(sizes.max() if sizes.size else 0.0)
        bins = [(sizes < 0.1).sum(), ((sizes >= 0.1) & (sizes < 1)).sum(), ((sizes >= 1) & (sizes < 10)).sum(),
                (sizes >= 10).sum()]
        assert row[["lesions_lt_0_1ml", "lesions_0_1_to_1ml", "lesions_1_to_10ml", "lesions_ge_10ml"]].tolist() == bins
        assert (row["anomaly_threshold"], row["min_lesion_ml"]) == (threshold, min_ml)
        assert row["subject"] is not None and pd.isna(row["runtime_s"])
    meta = pq.read_schema(result.tables["volumes"]).metadata
    assert json.loads(meta[b"phanes.thresholds"])["anomaly_threshold"] == threshold
    assert json.loads((tmp_path / "new" / "stats.json").read_text())["min_lesion_ml"] == min_ml


def test_stats_missing_map_formats_and_cli(runs: dict, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["first"], run)
    (run / "maps" / "permuted_anomaly.nii.gz").unlink()
    result = CliRunner().invoke(app, ["stats", str(run), "--format", "csv", "--threshold", "0"])
    assert result.exit_code == 0, result.output
    with (run / "stats" / "failures.csv").open() as handle:
        failures = {r["id"]: r for r in csv.DictReader(handle)}
    assert set(failures) == {"gone", "permuted"}
    assert failures["permuted"]["stage"] == "stats" and "anomaly map not found" in failures["permuted"]["message"]
    volumes = pd.read_csv(run / "stats" / "volumes.csv", dtype={"subject": str}).set_index("id")
    assert volumes.loc["permuted", "status"] == "failed" and pd.isna(volumes.loc["permuted", "lesion_burden_ml"])
    assert volumes.loc["permuted", "subject"] == "001"
    assert json.loads(volumes.loc["ras", "shape"]) == [volumes.loc["ras", f"shape_{a}"] for a in "xyz"]
    assert volumes.loc["ras", "anomaly_threshold"] == 0.0
    as_json = run_stats(run, tmp_path / "j", fmt="json")
    payload = json.loads(as_json.tables["lesions"].read_text())
    assert payload["metadata"]["phanes.schema_version"] == SCHEMA_VERSION and all(r["id"] for r in payload["rows"])
    with pytest.raises(ConfigError, match="threshold"):
        run_stats(run, tmp_path / "x", threshold=float("nan"))
    with pytest.raises(ConfigError, match="format"):
        run_stats(run, tmp_path / "x", fmt="xlsx")
    with pytest.raises(InputError, match=r"run\.json"):
        run_stats(tmp_path / "nothing")
    bad = CliRunner().invoke(app, ["stats", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "run.json" in bad.output
