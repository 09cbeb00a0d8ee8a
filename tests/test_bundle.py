"""Model bundles: save/load round trip, hash verification, and safetensors-only weights (never pickle)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from phanes_cli.core.bundle import INDEX_FILE, load_bundle, save_bundle, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.errors import BundleError
from phanes_cli.runtimes.pytorch import PhanesNetworks, load_networks
from tests._tiny_cohort import tiny_config


@pytest.fixture(scope="module")
def nets() -> PhanesNetworks:
    torch.manual_seed(0)
    return PhanesNetworks(tiny_config()).eval()


@pytest.fixture
def folder(tmp_path: Path, nets: PhanesNetworks) -> Path:
    save_bundle(tmp_path / "b", tiny_config(), nets.ra, nets.generator, extra={"training": {"steps": 3}})
    return tmp_path / "b"


def test_round_trip_restores_config_weights_and_outputs(folder: Path, nets: PhanesNetworks) -> None:
    bundle = load_bundle(folder, require_calibration=False)
    assert bundle.config == tiny_config() and bundle.calibration is None
    assert bundle.versions["training"] == {"steps": 3}
    for name, module in (("ra", nets.ra), ("generator", nets.generator)):
        state = getattr(bundle, f"{name}_state")
        assert state.keys() == module.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_networks(bundle).ra.reconstruct(x), nets.ra.reconstruct(x))


def test_calibration_is_required_by_default_and_sealed_when_written(folder: Path) -> None:
    with pytest.raises(BundleError, match="calibrate"):
        load_bundle(folder)
    before = load_bundle(folder, require_calibration=False).hash
    cal = Calibration(mask_threshold=0.25, anomaly_threshold=0.125, n_slices=10, n_volumes=2)
    write_calibration(folder, cal)
    bundle = load_bundle(folder)
    assert bundle.calibration == cal and bundle.hash != before


@pytest.mark.parametrize("name", ["ra.safetensors", "generator.safetensors", "config.json", "versions.json"])
def test_a_changed_file_is_refused(folder: Path, name: str) -> None:
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="hash mismatch"):
        load_bundle(folder, require_calibration=False)


@pytest.mark.parametrize("name", ["generator.safetensors", "config.json", INDEX_FILE])
def test_an_incomplete_bundle_is_refused(folder: Path, name: str) -> None:
    (folder / name).unlink()
    with pytest.raises(BundleError):
        load_bundle(folder, require_calibration=False)


def test_an_unsealed_calibration_file_is_refused(folder: Path) -> None:
    (folder / "calibration.json").write_text(json.dumps({"mask_threshold": 0.0, "anomaly_threshold": 0.0}))
    with pytest.raises(BundleError, match="not covered"):
        load_bundle(folder, require_calibration=False)


def test_weights_are_safetensors_and_loading_never_unpickles(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ra.safetensors", "generator.safetensors"):
        raw = (folder / name).read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        assert header and all("dtype" in v for k, v in header.items() if k != "__metadata__")
    assert {p.suffix for p in folder.iterdir() if p.is_file()} <= {".json", ".safetensors"}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    load_bundle(folder, require_calibration=False)


def test_a_pickled_weight_file_is_refused_even_when_resealed(folder: Path, nets: PhanesNetworks) -> None:
    torch.save(nets.ra.state_dict(), folder / "ra.safetensors")
    index = json.loads((folder / INDEX_FILE).read_text())
    index["files"]["ra.safetensors"] = hashlib.sha256((folder / "ra.safetensors").read_bytes()).hexdigest()
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(BundleError):
        load_bundle(folder, require_calibration=False)


GOOD_CALIBRATION = {"mask_threshold": 0.25, "anomaly_threshold": 0.125, "n_slices": 10, "n_volumes": 2}


def test_calibration_commit_stores_thresholds_and_config_under_one_new_hash(folder: Path) -> None:
    before = load_bundle(folder, require_calibration=False)
    config = dataclasses.replace(before.config, mask=dataclasses.replace(before.config.mask, mask_percentile=95.0))
    new_hash = write_calibration(folder, Calibration(**GOOD_CALIBRATION), config=config)
    after = load_bundle(folder)
    assert after.hash == new_hash != before.hash
    assert after.config == config and after.calibration == Calibration(**GOOD_CALIBRATION)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
