"""`--backend auto` on the CPU chooses by what the usable backends measured on this machine (runtimes.measured),
and is quiet about a backend that failed its export gate.

A tiny untrained bundle is exported (ONNX graphs, the INT8 and OpenVINO gates) once per module; each test works
on a copy with its own user cache. The choice is checked independently of timing: the measured figures are
rewritten in the cache file and the choice must follow them; a malformed or incomplete entry must be measured
again (real ONNX Runtime and OpenVINO sessions on real slices of a shipped brain).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from phanes_cli.core.bundle import load_bundle, seal_index, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.runtimes import measured as measured_module
from phanes_cli.runtimes.artefacts import GateRefused
from phanes_cli.runtimes.doctor import bundle_report
from phanes_cli.runtimes.export import export_bundle
from phanes_cli.runtimes.measured import cache_file, cpu_identity, entry_key
from phanes_cli.runtimes.select import choose, plan_backend
from phanes_cli.screening.actors import InferenceActor
from tests._tiny_cohort import untrained_bundle

pytestmark = pytest.mark.slow  # an export with its gates, then real measurements
CPU = torch.device("cpu")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module", autouse=True)
def small_measurement() -> Iterator[None]:
    """Fewer slices per measurement than a user's (16): what is checked here is which figures are used and
    kept, not their precision; the 2-core test machine is shared."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measured_module, "SLICES", 4)
        patch.setattr(measured_module, "BATCH", 4)
        patch.setattr(measured_module, "REPEATS", 1)
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = untrained_bundle(tmp_path_factory.mktemp("measured") / "bundle", seed=3)
    export_bundle(folder, "onnx", gated=["onnxruntime-int8", "openvino"] if HAS_OPENVINO else ["onnxruntime-int8"])
    write_calibration(folder, Calibration(mask_threshold=0.05, anomaly_threshold=0.01))
    return folder


@pytest.fixture(scope="module")
def first_measurement(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The cache file that the bundle's first use under `auto` wrote (measured once per module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHANES_CACHE_DIR", str(tmp_path_factory.mktemp("first-use-cache")))
        choose("auto", load_bundle(exported), CPU)
        return cache_file(load_bundle(exported)).read_bytes()


@pytest.fixture
def copy(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the bundle with a user cache of its own, still empty."""
    monkeypatch.setenv("PHANES_CACHE_DIR", str(tmp_path / "cache"))
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


@pytest.fixture
def measured(copy: Path, first_measurement: bytes) -> Path:
    """`copy` whose cache holds the module's first measurement (the bundle's content key is the copy's too)."""
    path = cache_file(load_bundle(copy))
    path.parent.mkdir(parents=True)
    path.write_bytes(first_measurement)
    return copy


def _usable(folder: Path) -> set[str]:
    """What can run here, read from the export's own record (not through the code under test)."""
    gates = json.loads((folder / "engines" / "provenance.json").read_text())["gates"]
    return {"torch", "onnxruntime", *(name for name, verdict in gates.items() if verdict["passed"])} - {"openvino-bf16"}


def _entry(folder: Path) -> dict:
    bundle = load_bundle(folder)
    return json.loads(cache_file(bundle).read_text())["entries"][entry_key(torch.get_num_threads())]


def _rewrite(folder: Path, figures: dict[str, float]) -> None:
    """Put `figures` in place of the measured ones, as another measurement on this CPU would have left them."""
    path = cache_file(load_bundle(folder))
    data = json.loads(path.read_text())
    data["entries"][entry_key(torch.get_num_threads())]["slices_per_s"] = figures
    path.write_text(json.dumps(data))


def test_first_use_measures_every_usable_backend_and_the_choice_follows_the_cached_figures(copy: Path) -> None:
    usable = _usable(copy)
    assert {"torch", "onnxruntime"} <= usable
    first = choose("auto", load_bundle(copy), CPU)
    entry = _entry(copy)
    assert set(entry["slices_per_s"]) == usable and all(v > 0 for v in entry["slices_per_s"].values())
    assert entry["cpu"] == cpu_identity() and entry["threads"] == torch.get_num_threads()
    fastest = max(entry["slices_per_s"], key=entry["slices_per_s"].get)
    assert first.backend.name == fastest and first.why.startswith(f"backend {fastest}: ")
    assert "\n" not in first.why and "slices/s measured here" in first.why

    for winner in sorted(usable):  # timing-independent: the figures are written, the choice must follow them
        _rewrite(copy, {name: (1000.0 if name == winner else 1.0 + i) for i, name in enumerate(sorted(usable))})
        choice = choose("auto", load_bundle(copy), CPU)
        assert choice.backend.name == winner
        assert choice.why.startswith(f"backend {winner}: 1000.0 slices/s measured here")
        assert plan_backend("auto", load_bundle(copy), CPU).chosen == winner  # what `phanes doctor` shows
        assert _entry(copy)["measured"] == entry["measured"]  # read from the cache, not measured again


MALFORMED = {
    "not JSON": lambda path, key: path.write_bytes(b"{\xff not json"),
    "text as a figure": lambda path, key: _edit(path, key, lambda e: e["slices_per_s"].update(torch="fast")),
    "a usable backend missing": lambda path, key: _edit(path, key, lambda e: e["slices_per_s"].pop("onnxruntime")),
    "other runtime versions": lambda path, key: _edit(path, key, lambda e: e["versions"].update(onnxruntime="0.1")),
}


def _edit(path: Path, key: str, change: object) -> None:
    data = json.loads(path.read_text())
    change(data["entries"][key])  # type: ignore[operator]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_cache_entry_is_measured_again_not_trusted(measured: Path, kind: str) -> None:
    copy = measured
    path, key = cache_file(load_bundle(copy)), entry_key(torch.get_num_threads())
    _rewrite(copy, dict.fromkeys(_usable(copy), 1.0) | {"torch": 1000.0})
    MALFORMED[kind](path, key)
    choice = choose("auto", load_bundle(copy), CPU)
    entry = _entry(copy)  # measured again and stored: real figures of every usable backend, the injected ones gone
    assert set(entry["slices_per_s"]) == _usable(copy)
    assert all(isinstance(v, float) and 0 < v < 1000.0 for v in entry["slices_per_s"].values())
    assert choice.backend.name == max(entry["slices_per_s"], key=entry["slices_per_s"].get)


def test_a_failed_gate_is_skipped_quietly_under_auto_recorded_and_refused_when_named(measured: Path) -> None:
    copy = measured
    _rewrite(copy, dict.fromkeys(_usable(copy), 1.0) | {"onnxruntime-int8": 1000.0})  # measured fastest when it passed
    path = copy / "engines" / "provenance.json"
    provenance = json.loads(path.read_text())
    reason = "lesion Dice 0.910 < 0.98 (calibrated)"
    provenance["gates"]["onnxruntime-int8"].update(passed=False, reason=reason)
    path.write_text(json.dumps(provenance))
    seal_index(copy)
    bundle = load_bundle(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing a user should act on: no warning at all
        choice = choose("auto", bundle, CPU)
    assert choice.warnings == [] and choice.backend.name != "onnxruntime-int8"
    assert choice.skipped["onnxruntime-int8"] == f"onnxruntime-int8 failed its export gate: {reason}"
    with pytest.raises(GateRefused, match=r"^backend onnxruntime-int8 refused: onnxruntime-int8 failed its export "):
        choose("onnxruntime-int8", bundle, CPU)
    threads = torch.get_num_threads()
    try:
        report = InferenceActor(str(copy), bundle.hash, "auto", "cpu", 1, 4, False, None).backend_report()
    finally:
        torch.set_num_threads(threads)  # the actor set its own (one) in this process
    assert report["fallbacks"] == [] and "failed its export gate" in report["skipped"]["onnxruntime-int8"]
    assert report["why"].startswith(f"backend {report['backend']}: ")


def test_doctor_shows_the_measured_table_with_gate_verdicts_and_the_choice(copy: Path, first_measurement: bytes
                                                                           ) -> None:
    rows = bundle_report(copy, CPU)
    assert any(t == "measured" and f.startswith("nothing measured on this CPU yet") for t, f in rows)
    assert any(t == "backend" and "measured at first use" in f for t, f in rows)
    cache_file(load_bundle(copy)).parent.mkdir(parents=True)
    cache_file(load_bundle(copy)).write_bytes(first_measurement)
    figures = {name: 10.0 + i for i, name in enumerate(sorted(_usable(copy)))} | {"torch": 5.0, "onnxruntime": 90.0}
    _rewrite(copy, figures)
    table = [f.split() for t, f in bundle_report(copy, CPU) if t == "measured" and f.startswith("  ")]
    assert table[0] == ["backend", "slices/s", "gate", "chosen"]
    line = {row[0]: " ".join(row[1:]) for row in table[1:]}
    assert [row[0] for row in table[1:4]] == sorted(figures, key=lambda n: -figures[n])[:3]  # fastest first
    assert line["onnxruntime"] == "90.0 none needed chosen" and line["torch"] == "5.0 none needed"
    assert line["onnxruntime-int8"] == f"{figures['onnxruntime-int8']:.1f} passed"
    assert line["openvino-bf16"].startswith("- ")  # not measured: not usable here (no native bf16, or not gated)
