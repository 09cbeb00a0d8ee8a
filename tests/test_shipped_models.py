"""The shipped-model mechanism: the default bundle, what happens without one, `phanes models`, and the
first-use ONNX export into a user cache (once, under a lock, rebuilt when the cached copy is not the model)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from phanes_cli.cli import app
from phanes_cli.core.bundle import load_bundle, seal_index
from phanes_cli.core.shipped_models import default_bundle, find_bundles
from phanes_cli.errors import BundleError
from phanes_cli.runtimes import GATED_BACKENDS
from phanes_cli.runtimes.first_use import exported_copy
from tests.test_screening import make_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("shipped") / "tiny-v1")


@pytest.fixture
def shipped(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    shutil.copytree(tiny, models / tiny.name)
    monkeypatch.setenv("PHANES_MODELS_DIR", str(models))
    monkeypatch.setenv("PHANES_CACHE_DIR", str(tmp_path / "cache"))
    return models / tiny.name


def test_without_a_shipped_model_screen_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("PHANES_MODELS_DIR", str(tmp_path / "none"))
    result = CliRunner().invoke(app, ["screen", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no pretrained model ships" in lines[0]
    assert "--bundle" in lines[0] and "phanes train" in lines[0] and "phanes calibrate" in lines[0]
    assert not (tmp_path / "out").exists()


def test_default_bundle_is_the_only_one_or_the_named_one(shipped: Path) -> None:
    assert default_bundle() == shipped
    second = shipped.with_name("other")
    shutil.copytree(shipped, second)
    with pytest.raises(BundleError, match="several shipped models"):
        default_bundle()
    (shipped.parent / "DEFAULT").write_text("other\n")
    assert default_bundle() == second


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_models_variable_naming_no_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    kind: str) -> None:
    """A mistyped $PHANES_MODELS_DIR is named as such, not taken for "no model ships with phanes"."""
    target = tmp_path / "modles"
    if kind == "file":
        target.write_text("x")
    monkeypatch.setenv("PHANES_MODELS_DIR", str(target))
    result = CliRunner().invoke(app, ["screen", str(tmp_path), "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    expected = "a file, not a folder" if kind == "file" else "no such folder"
    assert result.exit_code == 2 and len(lines) == 1 and f"$PHANES_MODELS_DIR names {target}: {expected}" in lines[0]
    listed = CliRunner().invoke(app, ["models", "--path", str(tmp_path / "nothing")])
    assert listed.exit_code == 0 and f"$PHANES_MODELS_DIR names {target}: {expected}" in listed.output


def test_a_default_file_of_binary_or_unknown_text_is_a_bundle_error(shipped: Path) -> None:
    shutil.copytree(shipped, shipped.with_name("other"))
    marker = shipped.parent / "DEFAULT"
    marker.write_bytes(b"\xff\xfe\x00" * 1000)
    with pytest.raises(BundleError, match=r"several shipped models \(other, tiny-v1\) and DEFAULT names '.*', not one"):
        default_bundle()
    marker.write_text("../tiny-v1\n")
    with pytest.raises(BundleError, match=r"DEFAULT names '\.\./tiny-v1', not one of them; pass --bundle"):
        default_bundle()


HOSTILE_FIGURES: dict[str, list[Any]] = {
    "provenance.json": [[], {"training": "x", "cohort": "y", "source": "z"},
                        {"cohort": {"train": [1], "val": {"sources": [1, 2]}}}, {"training": {"seconds": True}},
                        {"source": {"commit": "[/]<b>x"},
                         "cohort": {"train": {"sources": {"[/b]<img src=x>": 1}}}}],
    "calibration.json": [{"mask_threshold": "x", "anomaly_threshold": 1}, {"tuning": {"validation": {"dice": "1"}}},
                         {"mask_threshold": 1, "anomaly_threshold": 2, "tuning": {"validation": [1]}}],
    "versions.json": [{"training": [1]}],
}


def test_models_lists_bundles_whose_json_files_hold_anything(tiny: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`phanes models` reads the JSON files unverified: a value of any type or shape is a "-", markup is text."""
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("PHANES_MODELS_DIR", str(tmp_path / "none"))
    count = 0
    for name, values in HOSTILE_FIGURES.items():
        for value in values:
            folder = tmp_path / "work" / f"b{count}"
            shutil.copytree(tiny, folder)
            (folder / name).write_text(json.dumps(value))
            count += 1
    huge = tmp_path / "work" / f"b{count}"
    shutil.copytree(tiny, huge)
    (huge / "provenance.json").write_text(json.dumps({"source": {"commit": "a" * (2 << 20)}}))
    result = CliRunner().invoke(app, ["models", "--path", str(tmp_path / "work")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "local" in line]
    assert len(rows) == count + 1
    assert any("[/]<b>x" in row and "[/b]<img src=x>" in row for row in rows)  # printed as text
    assert not any("aaaaaaaaaa" in row for row in rows)  # a file over 1 MB is not read for a table row


def test_bundle_path_that_is_a_file_says_so(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    result = CliRunner().invoke(app, ["export", "--bundle", str(file)])
    assert result.exit_code == 2 and "is a file; --bundle takes a model bundle folder" in result.output


def test_first_use_export_runs_once_under_a_lock_and_is_reused(shipped: Path, tmp_path: Path) -> None:
    reports: list[str] = []
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(exported_copy(shipped, report=reports.append)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(reports) == 1 and "first use of the shipped model" in reports[0]
    copy = results[0]
    assert results == [copy, copy] and copy.is_relative_to(tmp_path / "cache")
    files = json.loads((copy / "bundle.json").read_text())["files"]
    shipped_files = json.loads((shipped / "bundle.json").read_text())["files"]
    assert {k: files[k] for k in shipped_files} == shipped_files  # the same model, byte for byte
    assert {"engines/stage1.onnx", "engines/stage2.onnx", "engines/lpips.onnx"} <= set(files)
    assert load_bundle(copy).calibration == load_bundle(shipped).calibration
    assert not any((shipped / "engines").glob("*"))  # the shipped folder is never written
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 1
    # a cached copy whose weights differ from the shipped ones is not the model: rebuilt
    weights = copy / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 2
    assert load_bundle(copy).hash  # verified again after the rebuild
    # a copy exported before openvino-bf16 existed (neither a verdict nor a reason on it): exported again
    provenance = json.loads((copy / "engines" / "provenance.json").read_text())
    gates, not_gated = provenance["gates"], provenance["not_gated"]
    assert all(name in gates or name in not_gated for name in GATED_BACKENDS)
    gates.pop("openvino-bf16", None)
    not_gated.pop("openvino-bf16", None)
    (copy / "engines" / "provenance.json").write_text(json.dumps(provenance))
    seal_index(copy)
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 3
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 3


def test_first_use_rebuilds_a_damaged_or_displaced_copy_and_never_follows_its_links(shipped: Path,
                                                                                     tmp_path: Path) -> None:
    """A graph damaged after the export, a link where the copy belongs (its target is left alone) and a file
    where the unfinished copy belongs: each is rebuilt instead of failing or falling back to torch for ever."""
    reports: list[str] = []
    copy = exported_copy(shipped, report=reports.append)
    graph = copy / "engines" / "stage1.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 2
    shutil.rmtree(copy)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "engines").mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("keep")
    copy.symlink_to(elsewhere)
    copy.with_name(copy.name + ".partial").write_text("not a folder")
    assert exported_copy(shipped, report=reports.append) == copy and len(reports) == 3
    assert not copy.is_symlink() and (copy / "engines" / "stage1.onnx").is_file()
    assert (elsewhere / "keep.txt").read_text() == "keep" and not any((elsewhere / "engines").iterdir())
    assert load_bundle(copy).hash


def test_first_use_with_an_unwritable_cache_runs_the_shipped_model(shipped: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    monkeypatch.setenv("PHANES_CACHE_DIR", str(blocked / "cache"))
    reports: list[str] = []
    assert exported_copy(shipped, report=reports.append) == shipped
    assert len(reports) == 1 and "cannot write the model cache" in reports[0] and "PHANES_CACHE_DIR" in reports[0]


def test_models_lists_shipped_and_local_bundles_with_their_figures(shipped: Path, tiny: Path, tmp_path: Path) -> None:
    local = tmp_path / "work" / "runs" / "mine"
    shutil.copytree(tiny, local)
    (tmp_path / "work" / ".hidden").mkdir()
    shutil.copytree(tiny, tmp_path / "work" / ".hidden" / "skip")
    assert find_bundles([tmp_path / "work"]) == [local]
    result = CliRunner().invoke(app, ["models", "--path", str(tmp_path / "work")], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    cal = load_bundle(tiny).require_calibration()
    rows = [line for line in result.output.splitlines() if "shipped" in line or "local" in line]
    assert len(rows) == 2 and "tiny-v1" in rows[0] and "mine" in rows[1]
    assert f"mask {cal.mask_threshold:.4g}, anomaly {cal.anomaly_threshold:.4g}" in rows[1]
