"""CIFAR ResNets as used throughout the data-free distillation literature (DAFL, CMI, Fast, NAYER):
a 3×3 stride-1 stem without max-pool, then four BasicBlock stages of 64/128/256/512 channels.
A 32×32 input gives a 4×4 feature map; any input size works."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from muse.models.defaults import dataset_cfg
from muse.models.head import PooledLinearClassifier, init_weights

__all__ = ["CifarResNet", "BasicBlock", "cifar_cfg"]  # register_model appends each entrypoint


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def _make_stage(in_chs: int, out_chs: int, depth: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs, out_chs, stride)]
    blocks += [BasicBlock(out_chs, out_chs) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class CifarResNet(PooledLinearClassifier):
    """ResNet with a CIFAR stem; `layers` gives the number of blocks per stage."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        channels: tuple[int, int, int, int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(channels[0], channels[0], layers[0], stride=1)
        self.layer2 = _make_stage(channels[0], channels[1], layers[1], stride=2)
        self.layer3 = _make_stage(channels[1], channels[2], layers[2], stride=2)
        self.layer4 = _make_stage(channels[2], channels[3], layers[3], stride=2)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="act1"),
                             *[dict(num_chs=c, reduction=2**i, module=f"layer{i + 1}") for i, c in enumerate(channels)]]
        self._init_head(channels[-1] * BasicBlock.expansion, num_classes, global_pool, drop_rate)
        init_weights(self, zero_linear_bias=False)  # fc keeps torch's default init, bias included

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg for a CIFAR-10 model with a `conv1` stem and an `fc` classifier (input size,
    classes and mean/std from the dataset registry); register it under `<arch>.cifar10` and pass at least
    `pool_size`, the feature map size at 32×32."""
    return dataset_cfg("cifar10", first_conv="conv1", **kwargs)


default_cfgs = generate_default_cfgs({
    "cifar_resnet18.cifar10": cifar_cfg(pool_size=(4, 4)),
    "cifar_resnet34.cifar10": cifar_cfg(pool_size=(4, 4)),
})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlock stages of 2/2/2/2."""
    model_args = dict(layers=(2, 2, 2, 2))
    return build_model_with_cfg(CifarResNet, "cifar_resnet18", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
                                **dict(model_args, **kwargs))


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-34: BasicBlock stages of 3/4/6/3."""
    model_args = dict(layers=(3, 4, 6, 3))
    return build_model_with_cfg(CifarResNet, "cifar_resnet34", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
                                **dict(model_args, **kwargs))
