"""The command-line habits of the field: -h, completion, flags shown as flags, --device / --skull-strip where
networks run, screen's Ray sizing options, and `phanes config`. Completion goes through the installed `phanes`
script; the other cases run the same Typer app in this process (no ~5 s of imports each)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from phanes_cli.config import LIMITS, PhanesConfig, config_from_dict, load_config
from phanes_cli.config_show import limit_key, render_config
from tests.test_cli import ENV, PHANES, assert_one_error_line, phanes_in_process

ROOT = Path(__file__).resolve().parents[1]
NETWORK_COMMANDS = (["data", "prepare"], ["train"], ["calibrate"], ["evaluate"], ["screen"])


def _help(*command: str) -> str:
    run = phanes_in_process(*command, "-h")
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.split())


@pytest.mark.parametrize("command", NETWORK_COMMANDS, ids=" ".join)
def test_short_help_lists_device_and_skull_strip_and_shows_flags_as_flags(command: list[str]) -> None:
    text = _help(*command)
    assert f"Usage: phanes {' '.join(command)}" in text
    assert "--device" in text and "--skull-strip" in text and "auto|always|never" in text
    assert "<bool>" not in text


def test_screen_exposes_ray_sizing_options() -> None:
    text = _help("screen")
    for option in ("--max-in-flight", "--object-store-mb", "--node-ip", "--actors", "--gpus-per-actor",
                   "--cpus-per-actor", "--threads-per-actor"):
        assert option in text


def test_bad_choices_are_usage_errors() -> None:
    run = phanes_in_process("calibrate", "--bundle", "b", "--data", "d", "--skull-strip", "sometimes")
    assert run.returncode == 2 and "sometimes" in run.stderr and "Traceback" not in run.stderr


def test_shell_completion_is_available() -> None:
    # From an interactive bash, as a user asks for it: Typer finds the shell among the process's parents, so the
    # test must not depend on how pytest itself was started (a detached runner has no shell above it).
    # `; exit $?` keeps bash from exec'ing the command in its own place, so bash stays the parent.
    run = subprocess.run(["bash", "-c", f"'{PHANES}' --show-completion; exit $?"], capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr
    assert "complete" in run.stdout and "_PHANES_COMPLETE" in run.stdout


def _leaves(data: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    return [leaf for k, v in data.items()
            for leaf in (_leaves(v, (*path, k)) if isinstance(v, dict) else [(*path, k)])]


def _rendered(text: str) -> dict[tuple[str, ...], str]:
    """Leaf key path -> its line, read back by indentation (two spaces per level)."""
    stack: list[str] = []
    leaves = {}
    for line in text.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        key, _, rest = line.strip().partition(":")
        stack[depth:] = [key]
        if rest.strip():
            leaves[tuple(stack)] = line
    return leaves


@pytest.mark.parametrize("name", ["paper", "cpu", "demo"])
def test_config_show_is_complete_yaml_that_loads_back(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    text = render_config(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    lines = _rendered(text)
    assert sorted(lines) == sorted(_leaves(cfg.to_dict()))  # every key printed, once
    for path, line in lines.items():  # with its range exactly where one is enforced
        assert ("# allowed:" in line) == (limit_key(path) in LIMITS), line


def test_configs_readme_documents_every_key() -> None:
    readme = (ROOT / "configs" / "README.md").read_text()
    for path in _leaves(PhanesConfig().to_dict()):
        assert f"`{'.'.join(path)}`" in readme, ".".join(path)


def test_config_commands(tmp_path: Path) -> None:
    shown = phanes_in_process("config", "show", ROOT / "configs" / "cpu.yaml")
    assert shown.returncode == 0
    assert config_from_dict(yaml.safe_load(shown.stdout)) == load_config(ROOT / "configs" / "cpu.yaml")
    ok = phanes_in_process("config", "validate", *(ROOT / "configs" / f"{n}.yaml" for n in ("paper", "cpu", "demo")))
    assert ok.returncode == 0 and ok.stderr.count("valid") == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  image_size: big\n")
    assert_one_error_line(phanes_in_process("config", "validate", bad), "preprocess.image_size", "'big'")


def test_the_cli_choices_are_the_library_modes() -> None:
    from typing import get_args

    from phanes_cli.cli import SkullStrip
    from phanes_cli.inputs.brain_masks import SKULL_STRIP_MODES
    from phanes_cli.screening.bids_derivative import LAYOUTS

    assert get_args(SkullStrip) == SKULL_STRIP_MODES
    assert "<default|bids>" in _help("screen") and LAYOUTS == ("default", "bids")


def _commands() -> list[tuple[str, Any]]:
    """Every command of the app, groups walked: (full name, click command)."""
    import typer.main

    from phanes_cli.cli import app

    out: list[tuple[str, Any]] = []

    def walk(command: Any, prefix: str) -> None:
        if hasattr(command, "commands"):  # a group (Typer may vendor its own click classes)
            for name, sub in command.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            out.append((prefix, command))

    walk(typer.main.get_command(app), "")
    return out


def test_every_option_and_argument_has_help() -> None:
    commands = _commands()
    assert {"screen", "models", "report", "stats", "data prepare", "export"} <= {name for name, _ in commands}
    missing = [f"{name} {param.name}" for name, command in commands for param in command.params
               if not (getattr(param, "help", None) or "").strip()]
    assert missing == []


def test_fixed_choices_are_choices_matching_the_library() -> None:
    from typing import get_args

    from phanes_cli.cli import BackendName, ExportFormat, Precision, TableFormat
    from phanes_cli.runtimes import BACKENDS
    from phanes_cli.runtimes.export import FORMATS, PRECISIONS
    from phanes_cli.screening.restat import FORMATS as TABLE_FORMATS

    assert get_args(BackendName) == ("auto", *BACKENDS)
    assert set(get_args(ExportFormat)) == set(FORMATS) and set(get_args(Precision)) == set(PRECISIONS)
    assert set(get_args(TableFormat)) == set(TABLE_FORMATS)
    for command, option, bad in ((["screen", "x", "--out", "o"], "--backend", "fastest"),
                                 (["screen", "x", "--out", "o"], "--device", "gpu"),
                                 (["stats", "r"], "--format", "xlsx"), (["export", "--bundle", "b"], "--format", "pt"),
                                 (["data", "synth", "--out", "s"], "--kind", "tumour")):
        run = phanes_in_process(*command, option, bad)
        assert run.returncode == 2 and bad in run.stderr and "Traceback" not in run.stderr, (option, run.stderr)


def test_top_level_help_ends_with_the_usual_order_and_an_example() -> None:
    run = phanes_in_process("-h")
    assert run.returncode == 0
    tail = run.stdout.rstrip().splitlines()
    order = run.stdout[run.stdout.index("Usual order of commands"):]
    positions = [order.index(f"phanes {step}") for step in ("data prepare", "screen", "stats", "report")]
    assert positions == sorted(positions)
    assert tail[-2].strip() == "Example:" and tail[-1].strip().startswith("phanes screen")


def test_tables_printed_to_a_log_are_not_cut_to_80_columns(tmp_path: Path) -> None:
    """`phanes models` to a file (not a TTY): every row whole on one line, wider than 80 columns."""
    import os
    import subprocess
    import sys

    bundle = tmp_path / "runs" / "a_bundle_with_a_rather_long_folder_name_to_need_width"
    bundle.mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")
    (bundle / "calibration.json").write_text('{"mask_threshold": 0.123456, "anomaly_threshold": 0.0456789}')
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PHANES_MODELS_DIR"] = str(tmp_path / "none")
    with open(tmp_path / "log.txt", "w") as log:
        subprocess.run([sys.executable, "-m", "phanes_cli.cli", "models", "--path", str(tmp_path)], stdout=log,
                       stderr=subprocess.STDOUT, env=env, check=True, cwd=tmp_path)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    row = next(line for line in lines if "local" in line)
    assert str(bundle) in row and "mask 0.1235, anomaly 0.04568" in row and len(row) > 80
