"""The cheaper CPU backends: INT8 graphs in real ONNX Runtime sessions and OpenVINO compiled models (fp32, and
with the generator in bf16), built and gated by `phanes export` on a tiny untrained bundle, and refused with
their figure when the gate fails.

One bundle is exported (every gate) once per module; tests that change it work on a copy. OpenVINO's tests
skip with the reason when the package is not installed, the bf16 ones also on a CPU without native bf16.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from phanes_cli.cli import app
from phanes_cli.core.bundle import INDEX_FILE, load_bundle, seal_index, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import run_slices
from phanes_cli.runtimes import quantise
from phanes_cli.runtimes.artefacts import ArtefactError, GateRefused, RuntimeUnavailable
from phanes_cli.runtimes.measured import cache_file, entry_key
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.parity import PARITY_ATOL, gate_reference, mask_figures, reference_mask_threshold
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices
from phanes_cli.runtimes.select import BackendFallbackWarning, choose, choose_backend
from phanes_cli.screening.actors import InferenceActor
from tests._tiny_cohort import untrained_bundle

CPU = torch.device("cpu")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed (pip install 'phanes[openvino]')")
NATIVE_BF16 = HAS_OPENVINO and importlib.import_module("phanes_cli.runtimes.openvino").native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="openvino missing or this CPU has no native bf16 arithmetic")
TOP = "top 1% of the fp32 map"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # these untrained networks pass both CPU gates on the shipped brains (lesion Dice 0.995 and 1.0)
    return untrained_bundle(tmp_path_factory.mktemp("gated") / "plain", seed=2)


@pytest.fixture(scope="module")
def gated(plain: Path) -> tuple[Path, str]:
    """The bundle exported through the CLI with both gated backends, and the command's output."""
    folder = Path(shutil.copytree(plain, plain.parent / "gated"))
    result = CliRunner().invoke(app, ["export", "--bundle", str(folder)])
    assert result.exit_code == 0, result.output
    return folder, result.output


@pytest.fixture
def copy(gated: tuple[Path, str], tmp_path: Path) -> Path:
    return Path(shutil.copytree(gated[0], tmp_path / "bundle"))


def _gates(folder: Path) -> dict:
    return json.loads((folder / "engines" / "provenance.json").read_text())["gates"]


def test_export_writes_the_int8_generator_and_records_each_verdict(gated: tuple[Path, str]) -> None:
    folder, output = gated
    assert "gate onnxruntime-int8: passed" in output
    assert ("gate openvino: passed" in output) if HAS_OPENVINO else ("openvino not gated" in output)
    assert ("gate openvino-bf16: " in output) if NATIVE_BF16 else ("openvino-bf16 not gated" in output)
    verdict = _gates(folder)["onnxruntime-int8"]
    assert verdict["passed"] and verdict["reason"] is None and verdict["runtime_version"] == ort.__version__
    assert verdict["graphs"] == {"stage1": "stage1.onnx", "stage2": "stage2.int8.onnx", "lpips": "lpips.onnx"}
    index = json.loads((folder / INDEX_FILE).read_text())["files"]
    assert "engines/stage2.int8.onnx" in index and "engines/lpips.int8.onnx" not in index
    assert verdict["parity"]["brain"]["anomaly"] <= PARITY_ATOL["int8"]["anomaly"]
    assert verdict["mask_brains"] == list(GATE_BRAINS) and verdict["mask_slices"] == 24


def test_recorded_mask_figures_are_what_the_backends_compute(gated: tuple[Path, str]) -> None:
    """The gate's Dice and agreement, recomputed here with plain numpy from both backends' anomaly maps."""
    bundle = load_bundle(gated[0], require_calibration=False)
    x, brain = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS, 8)
    fp32 = OnnxRuntimeBackend.from_bundle(bundle, CPU)
    int8 = choose_backend("onnxruntime-int8", bundle, CPU)
    level = reference_mask_threshold(bundle, fp32, x, brain)
    maps = {b.name: np.concatenate([run_slices(x[i:i + 8], brain[i:i + 8], b, bundle.config, level).anomaly.numpy()
                                    for i in range(0, 24, 8)]) for b in (fp32, int8)}
    inside = brain.numpy() > 0
    threshold = np.quantile(maps["onnxruntime"][inside], 0.99)
    want, got = ((s >= threshold) & (s > 0) & inside for s in (maps["onnxruntime"], maps["onnxruntime-int8"]))
    recorded = _gates(gated[0])["onnxruntime-int8"]["masks"][TOP]
    assert recorded["threshold"] == pytest.approx(threshold, rel=1e-6)
    assert (recorded["fp32_voxels"], recorded["voxels"]) == (want.sum(), got.sum())
    assert recorded["dice"] == pytest.approx(2 * (want & got).sum() / (want.sum() + got.sum()))
    assert recorded["agreement"] == pytest.approx((want == got).mean())


def test_a_calibrated_bundle_is_also_judged_at_its_own_operating_point(copy: Path) -> None:
    write_calibration(copy, Calibration(mask_threshold=0.05, anomaly_threshold=0.01))
    bundle = load_bundle(copy)
    ref = gate_reference(bundle, OnnxRuntimeBackend.from_bundle(bundle, CPU))
    assert ref.mask_threshold == 0.05 and list(ref.levels) == ["calibrated", TOP] and ref.levels["calibrated"] == 0.01
    figures, _ = mask_figures(bundle, choose_backend("onnxruntime-int8", bundle, CPU), ref)
    inside = ref.brain.numpy() > 0
    assert figures["calibrated"]["fp32_voxels"] == ((ref.anomaly >= 0.01) & (ref.anomaly > 0) & inside).sum()


def test_int8_backend_runs_the_quantised_generator_and_fp32_elsewhere(gated: tuple[Path, str]) -> None:
    bundle = load_bundle(gated[0], require_calibration=False)
    int8, fp32 = choose_backend("onnxruntime-int8", bundle, CPU), OnnxRuntimeBackend.from_bundle(bundle, CPU)
    ops = {node.op_type for node in onnx.load(str(gated[0] / "engines" / "stage2.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x, _ = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS[:1], 5)
    mask = (torch.rand_like(x) > 0.8).float()
    masked = x * (1 - mask) + mask
    assert torch.equal(int8.reconstruct(x), fp32.reconstruct(x)) and torch.equal(int8.lpips(x, x), fp32.lpips(x, x))
    reference = TorchBackend(load_networks(bundle), CPU).inpaint(masked, mask)
    difference = float((int8.inpaint(masked, mask) - reference).abs().max())
    assert 0 < difference <= PARITY_ATOL["int8"]["x_ph"]  # really INT8 arithmetic, within the INT8 bound


@needs_openvino
def test_openvino_compiled_models_match_torch_at_any_batch(gated: tuple[Path, str]) -> None:
    from phanes_cli.runtimes.openvino import OpenVINOBackend

    bundle = load_bundle(gated[0], require_calibration=False)
    backend = choose_backend("openvino", bundle, CPU)
    assert isinstance(backend, OpenVINOBackend)
    torch_backend = TorchBackend(load_networks(bundle), CPU)
    for batch in (1, 6):
        x = torch.rand(batch, 1, 32, 32)
        mask = (torch.rand_like(x) > 0.7).float()
        calls = (("reconstruct", (x,)), ("inpaint", (x * (1 - mask) + mask, mask)), ("lpips", (x, x.flip(0))))
        for call, args in calls:
            got, want = getattr(backend, call)(*args), getattr(torch_backend, call)(*args)
            assert got.shape == (batch, 1, 32, 32)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeUnavailable, match="CPU only"):
        choose_backend("openvino", bundle, torch.device("cuda"))


def _corrupt_weight_scales(graph: bytes, factor: float = -1000.0) -> bytes:
    """The INT8 graph with every weight's dequantisation scale multiplied (and its sign flipped): a broken graph."""
    model = onnx.load_from_string(graph)
    initialisers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        weight = initialisers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and weight is not None and weight.data_type == onnx.TensorProto.INT8:
            scale = initialisers[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    return model.SerializeToString()


def test_a_broken_int8_graph_fails_its_gate_and_is_refused_with_the_figure(
        plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = quantise.quantise_graph
    monkeypatch.setattr(quantise, "quantise_graph", lambda graph, feeds: _corrupt_weight_scales(real(graph, feeds)))
    folder = Path(shutil.copytree(plain, tmp_path / "broken"))
    result = CliRunner().invoke(app, ["export", "--bundle", str(folder), "--cpu-backends", "onnxruntime-int8"])
    assert result.exit_code == 0, result.output  # the fp32 graphs are fine: only the INT8 backend is refused
    verdict = _gates(folder)["onnxruntime-int8"]
    assert not verdict["passed"]
    # the untrained generator's outputs span only ~0.05, so the parity bound holds: the masks on real brains catch it
    agreement = verdict["masks"][TOP]["agreement"]
    assert agreement < 0.999 and f"lesion voxel agreement {agreement:.3%} < 99.9% ({TOP})" in verdict["reason"]
    assert "gate onnxruntime-int8: REFUSED, " in result.output and not (folder / "engines/stage2.int8.onnx").exists()
    bundle = load_bundle(folder, require_calibration=False)
    figure = r"onnxruntime-int8 failed its export gate: .*lesion voxel agreement [0-9.]+% < 99\.9%"
    with pytest.raises(GateRefused, match=figure) as exc:
        choose_backend("onnxruntime-int8", bundle, CPU)
    assert "\n" not in str(exc.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under auto a failed gate is the export's verdict, not a warning
        choice = choose("auto", bundle, CPU)
    assert choice.backend.name in ("onnxruntime", "torch") and choice.warnings == []
    assert "lesion voxel agreement" in choice.skipped["onnxruntime-int8"]  # the run record keeps every figure
    write_calibration(folder, Calibration(mask_threshold=0.05, anomaly_threshold=0.01))
    actor = InferenceActor(str(folder), load_bundle(folder).hash, "auto", "cpu", 1, 4, False, None)
    report = actor.backend_report()  # what screening records: the skip with its reason, and no warning
    assert report["fallbacks"] == [] and "failed its export gate" in report["skipped"]["onnxruntime-int8"]


def test_a_named_backend_that_failed_its_gate_is_refused_with_every_figure(copy: Path) -> None:
    """A failed verdict whose first figures are parity ones (as the shipped model's INT8 one): the named backend's
    refusal keeps them all; `auto` records the same reason and warns about nothing."""
    path = copy / "engines" / "provenance.json"
    provenance = json.loads(path.read_text())
    reason = "random slices: x_ph 8.61e-02 > 5e-02; lesion Dice 0.910 < 0.98 (calibrated); lesion Dice 0.881 < 0.98"
    provenance["gates"]["onnxruntime-int8"].update(passed=False, reason=reason)
    path.write_text(json.dumps(provenance))
    seal_index(copy)
    bundle = load_bundle(copy, require_calibration=False)
    with pytest.raises(GateRefused) as exc:
        choose_backend("onnxruntime-int8", bundle, CPU)
    assert str(exc.value) == f"backend onnxruntime-int8 refused: onnxruntime-int8 failed its export gate: {reason}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = choose("auto", bundle, CPU)
    assert choice.skipped["onnxruntime-int8"] == f"onnxruntime-int8 failed its export gate: {reason}"


@needs_openvino
def test_a_gate_passed_with_another_runtime_version_is_refused(copy: Path) -> None:
    path = copy / "engines" / "provenance.json"
    provenance = json.loads(path.read_text())
    for name, verdict in provenance["gates"].items():
        verdict["runtime_version"] = "1.0.0" if name == "onnxruntime-int8" else "2020.1.0"
    path.write_text(json.dumps(provenance))
    seal_index(copy)  # as if exported with those versions: the seal holds, the versions do not
    bundle = load_bundle(copy, require_calibration=False)
    with pytest.raises(ArtefactError, match=r"openvino was gated with openvino 2020\.1\.0, .* installed; re-export"):
        choose_backend("openvino", bundle, CPU)
    with pytest.warns(BackendFallbackWarning) as warned:  # another version: a re-export to act on, so a warning
        assert choose_backend("auto", bundle, CPU).name in ("onnxruntime", "torch")
    messages = [str(w.message) for w in warned]  # in CPU_BACKENDS order, each with its reason
    refused = ["onnxruntime-int8", *(["openvino-bf16"] if NATIVE_BF16 else []), "openvino"]
    assert [m.split()[1] for m in messages] == refused
    assert "gated with onnxruntime 1.0.0" in messages[0] and all("openvino 2020.1.0" in m for m in messages[1:])


@needs_bf16
def test_openvino_bf16_runs_the_generator_in_bf16_and_the_rest_as_fp32_openvino(gated: tuple[Path, str]) -> None:
    from phanes_cli.runtimes.openvino import OpenVINOBackend

    verdict = _gates(gated[0])["openvino-bf16"]
    assert verdict["precision"] == "bf16" and verdict["bf16_graphs"] == ["stage2"]
    bundle = load_bundle(gated[0], require_calibration=False)
    bf16 = OpenVINOBackend.from_bundle(bundle, CPU, bf16=True)
    fp32 = choose_backend("openvino", bundle, CPU)
    assert bf16.name == "openvino-bf16"
    x, _ = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS[:1], 5)
    mask = (torch.rand_like(x) > 0.8).float()
    masked = x * (1 - mask) + mask
    assert torch.equal(bf16.reconstruct(x), fp32.reconstruct(x)) and torch.equal(bf16.lpips(x, x.flip(-1)),
                                                                                   fp32.lpips(x, x.flip(-1)))
    reference = TorchBackend(load_networks(bundle), CPU).inpaint(masked, mask)
    difference = float((bf16.inpaint(masked, mask) - reference).abs().max())
    assert 1e-4 < difference <= PARITY_ATOL["bf16"]["x_ph"]  # beyond fp32 rounding: really bf16, within its bound
    with pytest.raises(RuntimeUnavailable, match="the openvino-bf16 backend runs on the CPU only, not on cuda"):
        choose_backend("openvino-bf16", bundle, torch.device("cuda"))


@needs_bf16
def test_a_screening_actor_runs_openvino_bf16_when_named_and_under_auto_by_the_bench(copy: Path) -> None:
    write_calibration(copy, Calibration(mask_threshold=0.05, anomaly_threshold=0.01))
    named = InferenceActor(str(copy), load_bundle(copy).hash, "openvino-bf16", "cpu", 1, 4, False, None)
    assert named.backend_report()["backend"] == "openvino-bf16"
    choose("auto", load_bundle(copy), CPU)  # measured here, then bf16 made the fastest in the cache file
    path = cache_file(load_bundle(copy))
    data = json.loads(path.read_text())
    figures = data["entries"][entry_key(torch.get_num_threads())]["slices_per_s"]  # 1: the actor above set it
    figures.update(dict.fromkeys(figures, 1.0) | {"openvino-bf16": 30.0})
    path.write_text(json.dumps(data))
    auto = InferenceActor(str(copy), load_bundle(copy).hash, "auto", "cpu", 1, 4, False, None)
    report = auto.backend_report()
    assert report["backend"] == "openvino-bf16" and report["fallbacks"] == []
    assert report["why"].startswith("backend openvino-bf16: 30.0 slices/s measured here (1 thread)")


@needs_openvino
def test_without_native_bf16_the_bf16_backend_is_neither_gated_nor_run(
        gated: tuple[Path, str], plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phanes_cli.runtimes import openvino

    copy = Path(shutil.copytree(gated[0], tmp_path / "exported"))
    monkeypatch.setattr(openvino, "native_bf16", lambda: False)  # a CPU without AVX512-BF16 or AMX
    folder = Path(shutil.copytree(plain, tmp_path / "plain"))
    result = CliRunner().invoke(app, ["export", "--bundle", str(folder), "--cpu-backends", "openvino-bf16"])
    assert result.exit_code == 0, result.output
    assert "openvino-bf16 not gated: this CPU has no native bf16 arithmetic" in result.output
    assert "openvino-bf16" not in _gates(folder)
    not_gated = json.loads((folder / "engines" / "provenance.json").read_text())["not_gated"]
    assert not_gated == {"openvino-bf16": "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX)"}
    bundle = load_bundle(copy, require_calibration=False)  # gated on a bf16 CPU, loaded on one without
    with pytest.raises(RuntimeUnavailable, match="openvino-bf16 needs a CPU with native bf16 arithmetic"):
        choose_backend("openvino-bf16", bundle, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped quietly, like a runtime that is not installed
        assert choose_backend("auto", bundle, CPU).name != "openvino-bf16"


def test_openvino_missing_is_a_one_line_install_hint(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phanes_cli.runtimes import select

    monkeypatch.setattr(select, "available", lambda module: module != "openvino")
    bundle = load_bundle(copy, require_calibration=False)
    with pytest.raises(RuntimeUnavailable, match=r"OpenVINO backend needs the optional package openvino: pip install "
                                                 r"'phanes\[openvino\]'"):
        choose_backend("openvino", bundle, CPU)
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'phanes\[openvino\]'"):
        choose_backend("openvino-bf16", bundle, CPU)
    # absent, not refused: auto measures and picks among the others, without a warning
    assert choose_backend("auto", bundle, CPU).name in {"onnxruntime-int8", "onnxruntime", "torch"}


def test_doctor_shows_openvino_and_the_gate_verdicts(gated: tuple[Path, str]) -> None:
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(gated[0]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    openvino = next(line for line in lines if line.startswith("openvino "))
    assert ("devices: CPU" in openvino) if HAS_OPENVINO else ("pip install 'phanes[openvino]'" in openvino)
    if HAS_OPENVINO:
        assert f"CPU bf16: {'native' if NATIVE_BF16 else 'none'}" in openvino
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():  # the kernel's own word on the CPU, independent of OpenVINO
            flags = set(cpuinfo.read_text().split())
            assert ("CPU bf16: native" in openvino) == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert any(line.startswith("gate ") and "onnxruntime-int8: passed" in line for line in lines)
    assert any(line.startswith("measured") and "onnxruntime-int8" in line for line in lines)  # auto's table
