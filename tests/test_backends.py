"""Backend selection, `phanes bench` and `phanes doctor` on a real exported bundle; TensorRT on a GPU only.

A tiny untrained bundle is exported once per module (real ONNX Runtime sessions); tests that change it
work on a copy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from phanes_cli.cli import app
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import run_slices
from phanes_cli.errors import ConfigError
from phanes_cli.runtimes import validate_backend_name
from phanes_cli.runtimes.artefacts import ArtefactError, RuntimeUnavailable
from phanes_cli.runtimes.export import export_bundle
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.runtimes.samples import brain_slices
from phanes_cli.runtimes.select import choose_backend, plan_backend
from tests._tiny_cohort import untrained_bundle

CPU = torch.device("cpu")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_bundle(tmp_path_factory.mktemp("backends") / "plain", seed=0)


@pytest.fixture(scope="module")
def exported(plain: Path) -> Path:
    """ONNX graphs only: the gated CPU backends have their own tests (test_gated_backends.py)."""
    folder = Path(shutil.copytree(plain, plain.parent / "exported"))
    export_bundle(folder, gated=[])
    return folder


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def test_backend_names_are_validated() -> None:
    names = ["auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "tensorrt"]
    assert [validate_backend_name(n) for n in names] == names
    with pytest.raises(ConfigError, match="unknown backend 'tflite'; choose one of: auto, torch, onnxruntime"):
        validate_backend_name("tflite")


def test_auto_on_cpu_uses_torch_until_graphs_are_exported(plain: Path, exported: Path) -> None:
    assert choose_backend("auto", load_bundle(plain, require_calibration=False), CPU).name == "torch"
    with pytest.raises(ArtefactError, match=r"provenance\.json: no exported graphs.*phanes export"):
        choose_backend("onnxruntime", load_bundle(plain, require_calibration=False), CPU)
    bundle = load_bundle(exported, require_calibration=False)  # exported without the gated backends
    chosen = choose_backend("auto", bundle, CPU).name  # measures the runnable backends here, takes the faster
    plan = plan_backend("auto", bundle, CPU)  # and the cached measurement decides the same again
    assert plan.chosen == chosen in {"onnxruntime", "torch"} and "measured here" in plan.why
    assert "onnxruntime-int8 was not gated" in plan.skipped["onnxruntime-int8"]


def test_tensorrt_is_refused_clearly_without_a_gpu(exported: Path) -> None:
    if HAS_TENSORRT:
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    with pytest.raises(RuntimeUnavailable, match="tensorrt"):
        choose_backend("tensorrt", load_bundle(exported, require_calibration=False), CPU)


def test_onnxruntime_and_torch_backends_give_the_same_maps(exported: Path) -> None:
    bundle = load_bundle(exported, require_calibration=False)
    x, brain = brain_slices(bundle.config.preprocess, 5)
    cal = Calibration(mask_threshold=0.05, anomaly_threshold=0.01)
    ref = run_slices(x, brain, TorchBackend(load_networks(bundle), CPU), bundle.config, cal.mask_threshold)
    got = run_slices(x, brain, choose_backend("onnxruntime", bundle, CPU), bundle.config, cal.mask_threshold,
                     given_mask=ref.inpaint_mask)
    for key in ("x_cph", "x_ph", "anomaly"):
        torch.testing.assert_close(getattr(got, key), getattr(ref, key), atol=1e-4, rtol=0)


def test_bench_writes_bench_json_and_auto_follows_it(copy: Path) -> None:
    args = ["bench", "--bundle", str(copy), "--slices", "4", "--repeats", "1", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "slices/s" in result.output and "onnxruntime" in result.output
    bench = json.loads((copy / "engines" / "bench.json").read_text())["cpu"]
    for name in ("torch", "onnxruntime"):
        row = bench["results"][name]
        assert row["slices_per_s"] == pytest.approx(4 / row["total_s"])
        assert row["network_s"] + row["other_s"] == pytest.approx(row["total_s"])
        assert 0 < row["network_s"] < row["total_s"]
        parts = [row["stage1_s"], row["stage2_s"], row["lpips_s"]]  # one pass: its parts add up to its networks
        assert all(p > 0 for p in parts) and sum(parts) == pytest.approx(row["network_s"])
        printed = next(line.split() for line in result.output.splitlines() if line.startswith(f"{name} "))
        assert [float(v) for v in printed[3:6]] == pytest.approx(parts, abs=6e-4)  # the table's three columns
    assert "stage 1 s" in result.output and "LPIPS s" in result.output
    assert "skipped" in bench["results"]["tensorrt"] or HAS_TENSORRT
    assert "skipped" in bench["results"]["openvino"]  # not gated at this export (or openvino not installed)
    fastest = max(("torch", "onnxruntime"), key=lambda n: bench["results"][n]["slices_per_s"])
    assert bench["fastest"] == fastest
    bundle = load_bundle(copy, require_calibration=False)  # bench.json is sealed into the index
    assert choose_backend("auto", bundle, CPU).name == fastest  # bench's figures are this machine's measurement
    speed = bench["results"][fastest]["slices_per_s"]
    assert plan_backend("auto", bundle, CPU).why.startswith(f"backend {fastest}: {speed:.1f} slices/s measured here")


def test_doctor_reports_machine_ray_and_per_stage_backends(copy: Path) -> None:
    (copy / "engines" / "stage1.onnx").write_bytes(b"not a graph")
    with socket.socket() as listener:
        listener.bind(("127.0.0.3", 0))
        listener.listen()
        port = listener.getsockname()[1]
        args = ["doctor", "--bundle", str(copy), "--device", "cpu", "--address", f"127.0.0.3:{port}"]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = {line.split(None, 1)[0]: line for line in result.output.splitlines() if line.strip()}
    assert "onnxruntime" in lines and "CPUExecutionProvider" in lines["onnxruntime"]
    assert "tensorrt" in lines and "lpips" in result.output and "AlexNet" in result.output
    assert f"127.0.0.3:{port}: reachable" in result.output
    assert "stage1.onnx: changed since export" in result.output  # stage 1's graph is refused, the others are fine
    assert "stage stage2" in result.output and "onnx: ok" in result.output
    assert "every stage on cpu: torch" in result.output
    closed = CliRunner().invoke(app, ["doctor", "--address", f"127.0.0.3:{port}"])
    assert "NOT reachable" in closed.output


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engines_build_run_and_match_torch(copy: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--bundle", str(copy), "--format", "all", "--precision", "fp16",
                                      "--opt-batch", "8", "--max-batch", "16"])
    assert result.exit_code == 0, result.output
    provenance = json.loads((copy / "engines" / "provenance.json").read_text())
    entry = provenance["artefacts"]["stage1.fp16.engine"]
    major, minor = torch.cuda.get_device_capability()
    assert entry["compute_capability"] == f"{major}.{minor}" and entry["batch_profile"]["max"] == 16
    assert (copy / "engines" / "timing.cache").is_file()
    bundle = load_bundle(copy, require_calibration=False)
    cuda = torch.device("cuda")
    backend = choose_backend("auto", bundle, cuda)
    assert backend.name == "tensorrt"
    x = torch.rand(20, 1, 32, 32, device=cuda)  # more than max batch: the engine runs it in two chunks
    ref = TorchBackend(load_networks(bundle), cuda, autocast=False).reconstruct(x)
    torch.testing.assert_close(backend.reconstruct(x), ref, atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and a CUDA GPU")
def test_an_engine_for_another_gpu_is_refused_and_auto_falls_back(copy: Path) -> None:
    from phanes_cli.core.bundle import seal_index
    from phanes_cli.runtimes.select import BackendFallbackWarning

    export_bundle(copy, "all", "fp32")
    path = copy / "engines" / "provenance.json"
    data = json.loads(path.read_text())
    data["artefacts"]["stage2.fp32.engine"]["compute_capability"] = "1.0"
    path.write_text(json.dumps(data))
    seal_index(copy)
    with pytest.warns(BackendFallbackWarning, match=r"compute capability 1\.0"):
        backend = choose_backend("auto", load_bundle(copy, require_calibration=False), torch.device("cuda"))
    assert backend.name != "tensorrt"


def test_calibrate_on_onnxruntime_matches_torch(copy: Path, tmp_path: Path) -> None:
    """`calibrate --backend onnxruntime` runs the exported graphs and finds the thresholds torch finds."""
    from phanes_cli.calibrate.options import CalibrateOptions
    from phanes_cli.calibrate.run import calibrate
    from tests._tiny_cohort import write_cohort

    manifest = write_cohort(tmp_path / "cohort", n_train=1, n_val=2)
    other = Path(shutil.copytree(copy, tmp_path / "torch-bundle"))
    on_ort = calibrate(CalibrateOptions(manifest=manifest, bundle=copy, device="cpu", progress=False, tune=False,
                                        backend="onnxruntime"))
    on_torch = calibrate(CalibrateOptions(manifest=manifest, bundle=other, device="cpu", progress=False, tune=False,
                                          backend="torch"))
    assert on_ort.mask_threshold == pytest.approx(on_torch.mask_threshold, rel=1e-3)
    assert on_ort.anomaly_threshold == pytest.approx(on_torch.anomaly_threshold, rel=1e-3)
    with pytest.raises(ConfigError, match="unknown backend"):
        calibrate(CalibrateOptions(manifest=manifest, bundle=other, device="cpu", progress=False, tune=False,
                                   backend="tflite"))
