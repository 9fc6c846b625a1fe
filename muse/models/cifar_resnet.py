"""CIFAR ResNets as used throughout the data-free distillation literature (DAFL, CMI, Fast, NAYER):
a 3×3 stride-1 stem without max-pool, then four BasicBlock stages of 64/128/256/512 channels.
A 32×32 input gives a 4×4 feature map; any input size works."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "BasicBlock"]  # register_model appends each entrypoint

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # the values the CMI/Fast/NAYER code bases normalise with


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


class CifarResNet(nn.Module):
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
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(channels[0], channels[0], layers[0], stride=1)
        self.layer2 = _make_stage(channels[0], channels[1], layers[1], stride=2)
        self.layer3 = _make_stage(channels[1], channels[2], layers[2], stride=2)
        self.layer4 = _make_stage(channels[2], channels[3], layers[3], stride=2)
        self.num_features = channels[-1] * BasicBlock.expansion
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=pool_type, **get_device_dtype(self)
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "cifar_resnet18": _cfg(),
    "cifar_resnet34": _cfg(),
})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlock stages of 2/2/2/2."""
    model_args = dict(layers=(2, 2, 2, 2))
    return build_model_with_cfg(CifarResNet, "cifar_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-34: BasicBlock stages of 3/4/6/3."""
    model_args = dict(layers=(3, 4, 6, 3))
    return build_model_with_cfg(CifarResNet, "cifar_resnet34", pretrained, **dict(model_args, **kwargs))
