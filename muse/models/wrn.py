"""Wide ResNets (Zagoruyko & Komodakis) in the CIFAR form used by the data-free distillation literature
(CMI, Fast, NAYER): a 3×3 stem, three stages of pre-activation blocks of 16k/32k/64k channels, then a
final BN-ReLU. WRN-d-k has (d − 4) / 6 blocks per stage. A 32×32 input gives an 8×8 feature map."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from muse.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD

__all__ = ["WideResNet", "WideBasicBlock"]  # register_model appends each entrypoint


class WideBasicBlock(nn.Module):
    """Pre-activation block. When the shape changes, the 1×1 shortcut also sees the pre-activated input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, block_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(block_drop_rate)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _make_stage(in_chs: int, out_chs: int, depth: int, stride: int, block_drop_rate: float) -> nn.Sequential:
    blocks = [WideBasicBlock(in_chs, out_chs, stride, block_drop_rate)]
    blocks += [WideBasicBlock(out_chs, out_chs, 1, block_drop_rate) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor`. `block_drop_rate` is the paper's dropout inside each block;
    `drop_rate` is timm's dropout before the classifier."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        chs = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, chs[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _make_stage(chs[0], chs[1], n, 1, block_drop_rate)
        self.block2 = _make_stage(chs[1], chs[2], n, 2, block_drop_rate)
        self.block3 = _make_stage(chs[2], chs[3], n, 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.act = nn.ReLU(inplace=True)
        self.num_features = chs[3]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

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
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.act(self.bn1(x))

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
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "wrn16_2": _cfg(),
    "wrn40_2": _cfg(),
})


@register_model
def wrn16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2: two blocks per stage, widths 32/64/128."""
    model_args = dict(depth=16, widen_factor=2)
    return build_model_with_cfg(WideResNet, "wrn16_2", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2: six blocks per stage, widths 32/64/128."""
    model_args = dict(depth=40, widen_factor=2)
    return build_model_with_cfg(WideResNet, "wrn40_2", pretrained, **dict(model_args, **kwargs))
