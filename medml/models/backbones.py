"""The backbone registry: MONAI 3D networks as feature extractors ``(B, 1, D, H, W) -> (B, F)``.

Each entry uses MONAI's own feature variant or public feature method: ResNets with
``feed_forward=False`` (pooled features, no classifier), ``EfficientNetBNFeatures``, DenseNet's
``features`` block and SENet's ``features()``, followed by global average pooling where the
network returns maps. MONAI is imported only when a backbone is built.

To add a backbone: a factory ``(ModelConfig) -> nn.Module`` returning pooled features, in its
own file or here, and one ``BACKBONES.register`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medml.extensions import Registry

if TYPE_CHECKING:
    from torch import nn

    from medml.config import ModelConfig


@dataclass(frozen=True)
class BackboneSpec:
    """A factory of the pooled-feature network and a line of documentation."""

    build: Callable[[ModelConfig], nn.Module]
    doc: str = ""


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _pooled(features: Callable[[Any], Any], module: nn.Module, relu: bool) -> nn.Module:
    """``features`` (a public method or block of ``module``) + ReLU? + global average pool."""
    import torch.nn.functional as F
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, x):
            maps = features(x)
            maps = maps[-1] if isinstance(maps, list | tuple) else maps
            maps = F.relu(maps) if relu else maps
            return F.adaptive_avg_pool3d(maps, 1).flatten(1)

    return Pooled()


def _resnet(depth: int) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        from monai.networks import nets

        # conv1_t_stride=2 halves the first feature map in depth too: ~10x faster in 3D.
        return getattr(nets, f"resnet{depth}")(
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=cfg.conv1_t_stride,
            widen_factor=cfg.widen_factor,
            feed_forward=False,  # MONAI's option: pooled features, no classifier layer
            shortcut_type="B",
        )

    return build


def _densenet121(cfg: ModelConfig) -> nn.Module:
    from monai.networks import nets

    net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    return _pooled(lambda x: net.features(x), net, relu=True)  # as its class_layers do


def _efficientnet(variant: str) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        from monai.networks import nets

        net = nets.EfficientNetBNFeatures(variant, pretrained=False, spatial_dims=3, in_channels=1)
        return _pooled(net, net, relu=False)

    return build


def _seresnet50(cfg: ModelConfig) -> nn.Module:
    from monai.networks import nets

    net = nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=1)
    return _pooled(net.features, net, relu=False)


for _depth in (10, 18, 34, 50):
    BACKBONES.register(
        f"resnet{_depth}",
        BackboneSpec(_resnet(_depth), f"MONAI ResNet-{_depth} (3D, widen_factor, conv1 stride)"),
    )
BACKBONES.register("densenet121", BackboneSpec(_densenet121, "MONAI DenseNet-121 (3D)"))
BACKBONES.register("seresnet50", BackboneSpec(_seresnet50, "MONAI SE-ResNet-50 (3D)"))
for _i in range(3):
    BACKBONES.register(
        f"efficientnet-b{_i}",
        BackboneSpec(_efficientnet(f"efficientnet-b{_i}"), f"MONAI EfficientNet-B{_i} (3D)"),
    )
