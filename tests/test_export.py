"""`phanes export`: ONNX graphs in the bundle, parity with torch in real ONNX Runtime sessions, TensorRT's
operator list, provenance, and refusal of tampered or stale artefacts.

One tiny untrained bundle is exported once per module; tests that damage it work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from phanes_cli.cli import app
from phanes_cli.core.bundle import INDEX_FILE, load_bundle, save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import run_slices
from phanes_cli.errors import BundleError
from phanes_cli.runtimes.artefacts import ArtefactError, read_artefact
from phanes_cli.runtimes.export import OPSET, export_bundle
from phanes_cli.runtimes.onnx import OnnxRuntimeBackend
from phanes_cli.runtimes.parity import PARITY_ATOL
from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.trt_operators import MAX_OPSET, SUPPORTED_OPS, unsupported_nodes
from tests._tiny_cohort import tiny_config

GRAPH_FILES = ("stage1.onnx", "stage2.onnx", "lpips.onnx")


@pytest.fixture(scope="module")
def nets() -> PhanesNetworks:
    torch.manual_seed(0)
    return PhanesNetworks(tiny_config()).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, nets: PhanesNetworks) -> Path:
    folder = tmp_path_factory.mktemp("export") / "bundle"
    save_bundle(folder, tiny_config(), nets.ra, nets.generator)
    result = CliRunner().invoke(app, ["export", "--bundle", str(folder), "--format", "all", "--cpu-backends", ""])
    assert result.exit_code == 0, result.output
    assert "parity onnxruntime vs torch (brain slices)" in result.output
    return folder


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graphs_and_provenance_are_sealed_into_the_bundle(exported: Path) -> None:
    engines = exported / "engines"
    index = json.loads((exported / INDEX_FILE).read_text())["files"]
    provenance = json.loads((engines / "provenance.json").read_text())
    for name in (*GRAPH_FILES, "provenance.json"):
        assert (engines / name).is_file()
        assert f"engines/{name}" in index
    for name in GRAPH_FILES:
        digest = hashlib.sha256((engines / name).read_bytes()).hexdigest()
        assert index[f"engines/{name}"] == digest == provenance["artefacts"][name]["sha256"]
    assert provenance["artefacts"]["stage1.onnx"]["source_sha256"] == index["ra.safetensors"]
    assert provenance["artefacts"]["stage2.onnx"]["source_sha256"] == index["generator.safetensors"]
    assert provenance["opset"] == OPSET and provenance["versions"]["onnxruntime"] == ort.__version__
    assert provenance["artefacts"]["lpips.onnx"]["batch_profile"] == {"min": 1, "opt": 32, "max": 64}
    # no TensorRT here: "all" wrote the ONNX graphs and says why there are no engines
    assert any("TensorRT engines not built" in note for note in provenance["notes"])
    sealed = hashlib.sha256((exported / INDEX_FILE).read_bytes()).hexdigest()
    assert load_bundle(exported, require_calibration=False).hash == sealed


def test_onnx_runtime_matches_torch_modules_at_any_batch(exported: Path, nets: PhanesNetworks) -> None:
    """Each graph in a plain ORT session vs the torch module, at batch sizes the export never saw."""
    rng = np.random.default_rng(3)
    for batch in (1, 5):
        x = rng.random((batch, 1, 32, 32), dtype=np.float32)
        m = (rng.random((batch, 1, 32, 32)) > 0.7).astype(np.float32)
        with torch.no_grad():
            expected = {
                "stage1.onnx": nets.ra.reconstruct(torch.from_numpy(x)),
                "stage2.onnx": nets.generator(torch.from_numpy(x * (1 - m) + m), torch.from_numpy(m)),
                "lpips.onnx": nets.lpips(torch.from_numpy(x), torch.from_numpy(np.flip(x, 0).copy())),
            }
        feeds = {"stage1.onnx": {"x": x}, "stage2.onnx": {"masked": x * (1 - m) + m, "mask": m},
                 "lpips.onnx": {"a": x, "b": np.flip(x, 0).copy()}}
        for name, feed in feeds.items():
            (got,) = _session(exported / "engines" / name).run(None, feed)
            assert got.shape == (batch, 1, 32, 32)
            np.testing.assert_allclose(got, expected[name].numpy(), atol=1e-5, rtol=0)


def test_pipeline_parity_on_real_brain_slices(exported: Path, nets: PhanesNetworks) -> None:
    bundle = load_bundle(exported, require_calibration=False)
    x, brain = brain_slices(bundle.config.preprocess, 6)
    cal = Calibration(mask_threshold=0.05, anomaly_threshold=0.01)
    ref = run_slices(x, brain, TorchBackend(nets, torch.device("cpu")), bundle.config, cal.mask_threshold)
    got = run_slices(x, brain, OnnxRuntimeBackend.from_bundle(bundle, torch.device("cpu")), bundle.config,
                     cal.mask_threshold, given_mask=ref.inpaint_mask)
    for key in ("x_cph", "x_ph", "anomaly"):
        assert float((getattr(got, key) - getattr(ref, key)).abs().max()) <= PARITY_ATOL["fp32"][key]
    recorded = json.loads((exported / "engines" / "provenance.json").read_text())["parity"]["onnxruntime"]
    assert recorded["brain"]["x_cph"] <= PARITY_ATOL["fp32"]["x_cph"] and recorded["random"]["mask_agreement"] > 0.99


def test_every_graph_uses_only_operators_tensorrt_parses(exported: Path) -> None:
    for name in GRAPH_FILES:
        model = onnx.load(str(exported / "engines" / name))
        assert {node.op_type for node in model.graph.node} <= SUPPORTED_OPS, name
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= MAX_OPSET
        assert unsupported_nodes(model) == []


def test_operator_check_reports_what_tensorrt_rejects() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="cubic"),
             helper.make_node("Det", ["r"], ["y"], name="det")]
    graph = helper.make_graph(nodes, "g", [x], [y], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    problems = unsupported_nodes(model)
    assert any("opset 18" in p for p in problems)
    assert any("up" in p and "mode=cubic" in p for p in problems)
    assert any("det" in p and "Det is not supported" in p for p in problems)


def test_a_tampered_graph_is_refused_and_auto_falls_back_to_torch(copy: Path) -> None:
    from phanes_cli.runtimes.select import BackendFallbackWarning, choose_backend

    path = copy / "engines" / "stage2.onnx"
    path.write_bytes(path.read_bytes()[:-8] + b"tampered")
    bundle = load_bundle(copy, require_calibration=False)  # the torch weights are intact: the bundle still loads
    with pytest.raises(ArtefactError, match=r"stage2\.onnx: changed since export.*re-export with `phanes export"):
        choose_backend("onnxruntime", bundle, torch.device("cpu"))
    with pytest.warns(BackendFallbackWarning, match=r"stage2\.onnx"):
        backend = choose_backend("auto", bundle, torch.device("cpu"))
    assert backend.name == "torch"


def test_graphs_exported_from_older_weights_are_refused_as_stale(copy: Path) -> None:
    torch.manual_seed(1)
    retrained = PhanesNetworks(tiny_config())
    save_bundle(copy, tiny_config(), retrained.ra, retrained.generator)  # reseals the index over the old graphs
    bundle = load_bundle(copy, require_calibration=False)
    with pytest.raises(ArtefactError, match=r"stage1\.onnx: stale.*ra\.safetensors changed since export.*re-export"):
        read_artefact(bundle, "stage1.onnx")
    read_artefact(bundle, "lpips.onnx")  # LPIPS does not depend on the bundle's weights


def test_a_changed_provenance_file_is_refused(copy: Path) -> None:
    path = copy / "engines" / "provenance.json"
    data = json.loads(path.read_text())
    data["artefacts"]["stage1.onnx"]["source_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"provenance\.json: changed since export"):
        read_artefact(load_bundle(copy, require_calibration=False), "stage1.onnx")


HOSTILE_PROVENANCE = {"a list": b"[]", "binary": b"\xff\xfe{", "artefacts as a list": b'{"artefacts": [1]}',
                      "an entry as text": b'{"artefacts": {"stage1.onnx": "x"}}',
                      "a path as precision": b'{"artefacts": {}, "engine_precision": "../../x"}'}


@pytest.mark.parametrize("kind", HOSTILE_PROVENANCE)
def test_a_resealed_provenance_of_any_shape_is_refused_not_a_crash(copy: Path, kind: str) -> None:
    """A bundle re-sealed around a provenance file phanes did not write (a bundle from someone else): the
    backends that need it refuse it with a re-export hint, `auto` falls back to torch, `doctor` reports it."""
    from phanes_cli.core.bundle import seal_index
    from phanes_cli.runtimes.doctor import bundle_report
    from phanes_cli.runtimes.select import BackendFallbackWarning, choose_backend

    (copy / "engines" / "provenance.json").write_bytes(HOSTILE_PROVENANCE[kind])
    seal_index(copy)
    bundle = load_bundle(copy, require_calibration=False)
    with pytest.raises(ArtefactError, match=r"provenance\.json: .*re-export with `phanes export"):
        choose_backend("onnxruntime", bundle, torch.device("cpu"))
    with pytest.warns(BackendFallbackWarning):
        assert choose_backend("auto", bundle, torch.device("cpu")).name == "torch"
    rows = dict(bundle_report(copy, torch.device("cpu")))
    assert "provenance.json" in rows["stage stage1"], rows


MALFORMED_GATES = {
    "gates as a list": ([], "key 'gates' holds list, not a mapping"),
    "a verdict as text": ({"onnxruntime-int8": "passed"}, "key 'gates.onnxruntime-int8' holds str, not a mapping"),
    "passed as text": ({"openvino": {"passed": "yes"}}, "key 'gates.openvino.passed' is missing or not true/false"),
    "passed without its figures": ({"onnxruntime-int8": {"passed": True, "runtime_version": "1"}},
                                   "key 'gates.onnxruntime-int8.mask_slices' is missing or of the wrong type"),
    "figures of the wrong shape": ({"openvino": {"passed": True, "runtime_version": None, "mask_slices": 8,
                                                 "mask_brains": [1], "parity": {"brain": {"anomaly": 0.0}},
                                                 "masks": {"calibrated": [0.9]}}},
                                   "key 'gates.openvino.masks' is missing or of the wrong type"),
    "refused without a reason": ({"openvino-bf16": {"passed": False, "reason": ["x"]}},
                                 "key 'gates.openvino-bf16.reason' is missing or not one line of text"),
    "a reason of two lines": ({"openvino-bf16": {"passed": False, "reason": "a\nb"}},
                              "key 'gates.openvino-bf16.reason' is missing or not one line of text"),
    "a name with a line break": ({"x\ny": 1}, "key 'gates.x\\ny' holds int, not a mapping"),
}


@pytest.mark.parametrize("kind", MALFORMED_GATES)
def test_doctor_on_malformed_gate_verdicts_names_the_file_and_key(copy: Path, kind: str) -> None:
    """A re-sealed provenance whose export gate verdicts are not what phanes writes: `doctor` reports it in one
    line naming the file and the key (it raised TypeError), and the backends refuse the record."""
    from phanes_cli.core.bundle import seal_index
    from phanes_cli.runtimes.select import choose_backend

    gates, problem = MALFORMED_GATES[kind]
    path = copy / "engines" / "provenance.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "gates": gates}))
    seal_index(copy)
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(copy), "--device", "cpu"])
    assert result.exit_code == 0 and result.exception is None, result.output
    (gate,) = [line for line in result.output.splitlines() if line.startswith("gate ")]
    assert f"refused: {path}: {problem} (not a gate verdict phanes wrote); re-export with" in gate, gate
    assert "every stage on cpu: torch" in result.output
    with pytest.raises(ArtefactError, match="not a gate verdict phanes wrote"):
        choose_backend("onnxruntime", load_bundle(copy, require_calibration=False), torch.device("cpu"))


def test_a_resealed_benchmark_record_of_any_shape_changes_no_candidate(copy: Path) -> None:
    """bench.json is a record of where `phanes bench` ran: `auto` chooses by this machine's own measurement."""
    from phanes_cli.core.bundle import seal_index
    from phanes_cli.runtimes.select import CPU_BACKENDS, candidates

    for text in (b"[]", b'{"cpu": "onnxruntime"}', b"\xff", b'{"cpu": {"fastest": ["torch"]}}'):
        (copy / "engines" / "bench.json").write_bytes(text)
        seal_index(copy)
        order, _ = candidates("auto", load_bundle(copy, require_calibration=False), torch.device("cpu"))
        assert order == list(CPU_BACKENDS), text


def test_an_engine_entry_without_a_batch_count_is_refused(tmp_path: Path) -> None:
    from phanes_cli.runtimes.tensorrt import max_batch_of

    path = tmp_path / "engines" / "stage1.fp32.engine"
    assert max_batch_of({"batch_profile": {"max": 64}}, path) == 64
    for entry in ({}, {"batch_profile": [64]}, {"batch_profile": {"max": "64"}}, {"batch_profile": {"max": True}},
                  {"batch_profile": {"max": 0}}):
        with pytest.raises(ArtefactError, match="no valid batch profile"):
            max_batch_of(entry, path)


def test_tensorrt_format_without_tensorrt_is_a_clear_error(copy: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--bundle", str(copy), "--format", "tensorrt"])
    assert result.exit_code == 2
    assert "cannot build TensorRT engines here" in result.output


def test_bad_batch_profile_is_refused(copy: Path) -> None:
    from phanes_cli.errors import ConfigError
    from phanes_cli.runtimes.artefacts import BatchProfile

    with pytest.raises(ConfigError, match="min <= opt <= max"):
        export_bundle(copy, profile=BatchProfile(8, 4, 64))
