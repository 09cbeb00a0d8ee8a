"""Stage 1 (Soft-IntroVAE) and stage 2 (AOT-GAN) networks: sizes from method.md, shapes, behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from phanes_cli.config import AOTConfig, RAConfig, load_config
from phanes_cli.models import (
    AOTBlock,
    AOTGenerator,
    RADecoder,
    RAEncoder,
    ResidualBlock,
    SoftIntroVAE,
    SoftMaskDiscriminator,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gmacs(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2e9


def test_paper_sizes_match_method_md() -> None:
    """method.md: encoder ~16.4M params / 3.2 GMACs, decoder ~13.1M / 3.1, generator ~15.2M / 18.1 (within 2%)."""
    with torch.device("meta"):  # shapes and FLOPs without allocating or computing anything
        vae = SoftIntroVAE(RAConfig()).eval()
        generator = AOTGenerator(AOTConfig()).eval()
        x = torch.empty(1, 1, 128, 128)
        z = torch.empty(1, 128)
    assert _params(vae.encoder) == pytest.approx(16.4e6, rel=0.02)
    assert _params(vae.decoder) == pytest.approx(13.1e6, rel=0.02)
    assert _params(generator) == pytest.approx(15.2e6, rel=0.02)
    assert _gmacs(lambda: vae.encoder(x)) == pytest.approx(3.2, rel=0.02)
    assert _gmacs(lambda: vae.decoder(z)) == pytest.approx(3.1, rel=0.02)
    assert _gmacs(lambda: generator(x, x)) == pytest.approx(18.1, rel=0.02)


def test_paper_shapes() -> None:
    with torch.device("meta"):
        vae = SoftIntroVAE(RAConfig()).eval()
        generator = AOTGenerator(AOTConfig()).eval()
        discriminator = SoftMaskDiscriminator(AOTConfig())
        x = torch.empty(2, 1, 128, 128)
    mu, logvar, features = vae.encoder(x, return_features=True)
    x_rec, _, _ = vae(x)
    assert mu.shape == logvar.shape == (2, 128)
    assert [tuple(f.shape[1:]) for f in features] == [
        (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)
    ]
    assert x_rec.shape == (2, 1, 128, 128)
    assert generator(x, x).shape == (2, 1, 128, 128)
    assert discriminator(x).shape == (2, 1, 14, 14)


def test_outputs_are_images_in_unit_range() -> None:
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "demo.yaml")
    vae = SoftIntroVAE(cfg.ra).eval()
    generator = AOTGenerator(cfg.aot).eval()
    x = torch.rand(2, 1, 128, 128)
    mask = torch.zeros(2, 1, 128, 128)
    mask[..., 40:70, 50:90] = 1
    with torch.no_grad():
        x_rec, _, _ = vae(x)
        out = generator(x * (1 - mask) + mask, mask)
    for image in (x_rec, out):
        assert image.shape == (2, 1, 128, 128)
        assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_residual_block_shortcut() -> None:
    same = ResidualBlock(8, 8)
    grow = ResidualBlock(8, 16)
    assert isinstance(same.shortcut, torch.nn.Identity)
    assert isinstance(grow.shortcut, torch.nn.Conv2d) and grow.shortcut.kernel_size == (1, 1)
    x = torch.randn(2, 8, 10, 10)
    assert grow(x).shape == (2, 16, 10, 10)
    # With the residual branch zeroed the block is LeakyReLU(identity).
    for p in same.body.parameters():
        torch.nn.init.zeros_(p)
    torch.testing.assert_close(same.eval()(x), torch.nn.functional.leaky_relu(x, 0.2))


def test_reconstruct_is_deterministic_posterior_mean() -> None:
    torch.manual_seed(0)
    vae = SoftIntroVAE(RAConfig((8, 16, 32, 32, 32), 16), image_size=64).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        a = vae.reconstruct(x)
        b = vae.reconstruct(x)
        mu, _ = vae.encoder(x)
        c, _, _ = vae(x, deterministic=True)
        d, _, _ = vae(x, deterministic=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, vae.decoder(mu).detach())
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, d)


def test_encoder_decoder_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        RAEncoder(image_size=100)
    with pytest.raises(ValueError, match="5 widths"):
        RADecoder(channels=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="divisible"):
        AOTBlock(30, (1, 2, 4, 8))
    assert RADecoder((8, 8, 8, 8, 8), 4, image_size=64)(torch.zeros(2, 4)).shape == (2, 1, 64, 64)


def test_aot_block_gate_blends_input_and_context() -> None:
    torch.manual_seed(0)
    block = AOTBlock(16, (1, 2))
    x = torch.randn(2, 16, 12, 12)
    # A gate conv with zero weights gives a constant map, standardised to 0 -> g = 0.5 everywhere.
    for p in block.gate.parameters():
        torch.nn.init.zeros_(p)
    fused = block.fuse(torch.cat([b(x) for b in block.branches], dim=1))
    torch.testing.assert_close(block(x), 0.5 * x + 0.5 * fused)
    assert block.branches[1][0][1].dilation == (2, 2)


def test_generator_is_per_image_and_trains() -> None:
    torch.manual_seed(0)
    cfg = AOTConfig(base_channels=8, channels=32, blocks=2, disc_channels=(16, 32, 64, 64))
    generator = AOTGenerator(cfg)
    discriminator = SoftMaskDiscriminator(cfg)
    x = torch.rand(2, 1, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.7).float()
    out = generator(x * (1 - mask) + mask, mask)
    torch.testing.assert_close(out[1:], generator(x[1:] * (1 - mask[1:]) + mask[1:], mask[1:]))
    (out.mean() + discriminator(out).mean()).backward()
    for name, p in list(generator.named_parameters()) + list(discriminator.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_discriminator_is_spectrally_normalised() -> None:
    discriminator = SoftMaskDiscriminator(AOTConfig(disc_channels=(16, 32, 64, 64)))
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]


@pytest.mark.parametrize("name", ["paper", "cpu", "demo"])
def test_config_files_build_models(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.preprocess.image_size == 128
    with torch.device("meta"):
        vae = SoftIntroVAE(cfg.ra, cfg.preprocess.image_size)
        generator = AOTGenerator(cfg.aot)
        discriminator = SoftMaskDiscriminator(cfg.aot)
        x = torch.empty(1, 1, 128, 128)
    assert vae(x)[0].shape == generator(x, x).shape == (1, 1, 128, 128)
    assert discriminator(x).shape[:2] == (1, 1)
    if name == "paper":
        assert cfg.train.batch_size == 8 and cfg.train.stage1.lr == 5e-5 and cfg.train.stage1.max_epochs == 1500
        assert _params(vae) > 25e6
    else:
        assert _params(vae) + _params(generator) < 3e6
        assert cfg.train.stage1.max_steps is not None and cfg.train.stage2.max_steps is not None
