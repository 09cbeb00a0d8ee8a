"""`phanes calibrate` and `phanes train` take one options object each: the CLI's flags and the dataclass's fields
cannot drift apart (names and defaults compared programmatically), the CLI hands every flag to its field, and
`validate()` turns each bad value into a one-line error naming the option, before anything is read or written."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

import phanes_cli.calibrate.run
import phanes_cli.training.trainer
from phanes_cli.calibrate.options import CalibrateOptions
from phanes_cli.calibrate.run import calibrate
from phanes_cli.cli import app
from phanes_cli.config import load_config
from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import ConfigError
from phanes_cli.training.options import TrainOptions
from phanes_cli.training.trainer import train
from tests._tiny_cohort import tiny_config

# the CLI flag whose field has another name (`--data` is the manifest, as for `phanes evaluate`)
FIELD_OF_FLAG = {"data": "manifest"}
# fields no flag sets: the Python API's switch of the progress display
API_ONLY = {"progress"}


def _command(name: str) -> Any:
    """The Click command Typer builds for `phanes NAME` (Typer vendors Click: typed loosely)."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group.commands[name]


@pytest.mark.parametrize(("command", "options"), [("calibrate", CalibrateOptions), ("train", TrainOptions)])
def test_cli_flags_and_option_fields_have_the_same_names_and_defaults(command: str, options: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(options)}
    params = {FIELD_OF_FLAG.get(p.name or "", p.name): p for p in _command(command).params}
    assert set(params) == set(fields) - API_ONLY
    for name, param in params.items():
        field = fields[name]
        if param.required:
            assert field.default is dataclasses.MISSING, name
        else:
            assert field.default is not dataclasses.MISSING, name
            assert param.default == field.default, name


def _fake_calibration(calls: list[Any]) -> Any:
    def fake(options: CalibrateOptions) -> Calibration:
        calls.append(options)
        return Calibration(mask_threshold=0.5, anomaly_threshold=0.25, min_lesion_ml=0.1)
    return fake


def test_calibrate_cli_builds_the_default_options_and_passes_every_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[CalibrateOptions] = []
    monkeypatch.setattr(phanes_cli.calibrate.run, "calibrate", _fake_calibration(calls))
    bundle, manifest, out = tmp_path / "bundle", tmp_path / "m.csv", tmp_path / "copy"
    runner = CliRunner()
    run = runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--data", str(manifest)])
    assert run.exit_code == 0, run.output
    assert calls == [CalibrateOptions(manifest=manifest, bundle=bundle)]
    assert f"calibrated {bundle}" in run.output
    flags = ["--out", str(out), "--split", "train", "--device", "cpu", "--skull-strip", "never", "--batch-size", "5",
             "--mask-percentile", "97.5", "--anomaly-percentile", "98", "--no-tune", "--no-slice-context",
             "--healthy-fp-budget-ml", "2", "--healthy-fp-budget-components", "3", "--backend", "onnxruntime",
             "--lpips-weights", "w.pth"]
    run = runner.invoke(app, ["calibrate", "--bundle", str(bundle), "--data", str(manifest), *flags])
    assert run.exit_code == 0, run.output
    assert calls[1] == CalibrateOptions(manifest=manifest, bundle=bundle, out=out, split="train", device="cpu",
                                        skull_strip="never", batch_size=5, mask_percentile=97.5,
                                        anomaly_percentile=98.0, tune=False, slice_context=False,
                                        healthy_fp_budget_ml=2.0, healthy_fp_budget_components=3.0,
                                        backend="onnxruntime", lpips_weights="w.pth")
    assert f"calibrated {out}" in run.output


def test_train_cli_builds_the_default_options_then_calibrates_the_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[TrainOptions] = []
    calibrated: list[CalibrateOptions] = []

    def fake_train(options: TrainOptions) -> Path:
        trained.append(options)
        return options.out

    monkeypatch.setattr(phanes_cli.training.trainer, "train", fake_train)
    monkeypatch.setattr(phanes_cli.calibrate.run, "calibrate", _fake_calibration(calibrated))
    config_file, manifest, out = tmp_path / "tiny.yaml", tmp_path / "m.csv", tmp_path / "model"
    config_file.write_text(yaml.safe_dump(tiny_config().to_dict()))
    args = ["train", "--config", str(config_file), "--data", str(manifest), "--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert trained == [TrainOptions(config=load_config(config_file), manifest=manifest, out=out)]
    assert calibrated == [CalibrateOptions(manifest=manifest, bundle=out)]
    source = tmp_path / "stage1"
    run = CliRunner().invoke(app, [*args, "--resume", "--stage1-from", str(source), "--device", "cpu",
                                   "--skull-strip", "always", "--lpips-weights", "w.pth"])
    assert run.exit_code == 0, run.output
    assert trained[1] == TrainOptions(config=load_config(config_file), manifest=manifest, out=out, resume=True,
                                      stage1_from=source, device="cpu", skull_strip="always", lpips_weights="w.pth")
    assert calibrated[1] == CalibrateOptions(manifest=manifest, bundle=out, device="cpu", skull_strip="always",
                                             lpips_weights="w.pth")


BAD_CALIBRATE = [
    ({"split": "test"}, "'test' split"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"skull_strip": "sometimes"}, "--skull-strip 'sometimes' is not one of"),
    ({"backend": "tflite"}, "unknown backend 'tflite'"),
    ({"mask_percentile": 0.0}, "--mask-percentile must lie strictly between 0 and 100, got 0.0"),
    ({"mask_percentile": math.nan}, "--mask-percentile must lie strictly between 0 and 100, got nan"),
    ({"anomaly_percentile": 100.0}, "--anomaly-percentile must lie strictly between 0 and 100, got 100.0"),
    ({"anomaly_percentile": -5.0}, "--anomaly-percentile must lie strictly between 0 and 100, got -5.0"),
    ({"healthy_fp_budget_ml": -1.0}, "--healthy-fp-budget-ml: .* finite number of mL >= 0, got -1.0"),
    ({"healthy_fp_budget_ml": math.inf}, "--healthy-fp-budget-ml: .* finite number of mL >= 0, got inf"),
    ({"healthy_fp_budget_components": -0.5}, "--healthy-fp-budget-components: .* components >= 0, got -0.5"),
    ({"healthy_fp_budget_components": math.nan}, "--healthy-fp-budget-components: .* components >= 0, got nan"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CALIBRATE)
def test_calibrate_refuses_each_bad_option_before_reading_anything(
        bad: dict[str, Any], message: str, tmp_path: Path) -> None:
    """A missing bundle and manifest: the refusal is the option's, raised before either is looked at."""
    options = CalibrateOptions(manifest=tmp_path / "none.csv", bundle=tmp_path / "nowhere", **bad)
    with pytest.raises(ConfigError, match=message):
        options.validate()
    with pytest.raises(ConfigError, match=message):
        calibrate(options)
    assert list(tmp_path.iterdir()) == []


def test_good_options_pass_validation(tmp_path: Path) -> None:
    CalibrateOptions(manifest=tmp_path / "m.csv", mask_percentile=99.9, anomaly_percentile=0.1,
                     healthy_fp_budget_ml=0.0, healthy_fp_budget_components=0.0).validate()
    TrainOptions(config=tiny_config(), manifest=tmp_path / "m.csv", out=tmp_path / "new",
                 stage1_from=tmp_path).validate()


def test_train_refuses_each_bad_option_before_reading_or_writing(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    base = TrainOptions(config=tiny_config(), manifest=tmp_path / "none.csv", out=tmp_path / "model")
    for bad, message in (({"skull_strip": "sometimes"}, "--skull-strip 'sometimes' is not one of"),
                         ({"out": a_file}, "--out must be a folder"),
                         ({"stage1_from": a_file}, "--stage1-from .*: not a model bundle folder"),
                         ({"stage1_from": tmp_path / "nowhere"}, "--stage1-from .*: not a model bundle folder")):
        options = dataclasses.replace(base, **bad)
        with pytest.raises(ConfigError, match=message):
            options.validate()
        with pytest.raises(ConfigError, match=message):
            train(options)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _one_line_error(run: Any, message: str) -> None:
    assert run.exit_code == 2, run.output
    assert run.output.count("\n") == 1 and run.output.startswith("error: "), run.output
    assert message in run.output


def test_cli_prints_the_option_error_on_one_line_and_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["calibrate", "--bundle", str(tmp_path / "nowhere"), "--data", str(tmp_path / "none.csv")]
    _one_line_error(runner.invoke(app, [*base, "--healthy-fp-budget-ml", "-1"]),
                    "--healthy-fp-budget-ml: healthy false-positive budget must be a finite number of mL >= 0, "
                    "got -1.0")
    _one_line_error(runner.invoke(app, [*base, "--mask-percentile", "100"]),
                    "--mask-percentile must lie strictly between 0 and 100, got 100.0")
    _one_line_error(runner.invoke(app, [*base, "--split", "test"]), "calibration never uses the 'test' split")
    config_file, a_file = tmp_path / "tiny.yaml", tmp_path / "file"
    config_file.write_text(yaml.safe_dump(tiny_config().to_dict()))
    a_file.write_text("not a folder")
    _one_line_error(runner.invoke(app, ["train", "--config", str(config_file), "--data", str(tmp_path / "none.csv"),
                                        "--out", str(a_file)]), f"{a_file}: --out must be a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny.yaml"]
