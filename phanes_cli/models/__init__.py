"""PHANES networks: stage 1 Soft-IntroVAE (`ra`), stage 2 AOT-GAN (`aotgan`), and the frozen ImageNet
networks used by the masks and losses (`backbones`, `lpips`)."""

from phanes_cli.models.aotgan import AOTBlock, AOTGenerator, SoftMaskDiscriminator
from phanes_cli.models.backbones import alexnet_features, load_backbone_state_dict, vgg16_features
from phanes_cli.models.lpips import SpatialLPIPS, VGG16Perceptual
from phanes_cli.models.ra import RADecoder, RAEncoder, ResidualBlock, SoftIntroVAE

__all__ = [
    "AOTBlock",
    "AOTGenerator",
    "RADecoder",
    "RAEncoder",
    "ResidualBlock",
    "SoftIntroVAE",
    "SoftMaskDiscriminator",
    "SpatialLPIPS",
    "VGG16Perceptual",
    "alexnet_features",
    "load_backbone_state_dict",
    "vgg16_features",
]
