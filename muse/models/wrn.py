"""Wide ResNets (Zagoruyko & Komodakis) in the CIFAR form used by the data-free distillation literature
(CMI, Fast, NAYER): a 3×3 stem, three stages of pre-activation blocks of 16k/32k/64k channels, then a
final BN-ReLU. WRN-d-k has (d − 4) / 6 blocks per stage. A 32×32 input gives an 8×8 feature map."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from muse.models.cifar_resnet import cifar_cfg
from muse.models.head import PooledLinearClassifier, init_weights

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


class WideResNet(PooledLinearClassifier):
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
        self.conv1 = nn.Conv2d(in_chans, chs[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _make_stage(chs[0], chs[1], n, 1, block_drop_rate)
        self.block2 = _make_stage(chs[1], chs[2], n, 2, block_drop_rate)
        self.block3 = _make_stage(chs[2], chs[3], n, 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.act = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=chs[1], reduction=1, module="block1"),
                             dict(num_chs=chs[2], reduction=2, module="block2"),
                             dict(num_chs=chs[3], reduction=4, module="act")]  # block3 after the final BN-ReLU
        self._init_head(chs[3], num_classes, global_pool, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.act(self.bn1(x))


default_cfgs = generate_default_cfgs({
    "wrn16_2.cifar10": cifar_cfg(pool_size=(8, 8)),
    "wrn40_2.cifar10": cifar_cfg(pool_size=(8, 8)),
})


@register_model
def wrn16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2: two blocks per stage, widths 32/64/128."""
    model_args = dict(depth=16, widen_factor=2)
    return build_model_with_cfg(WideResNet, "wrn16_2", pretrained, feature_cfg=dict(out_indices=(0, 1, 2)),
                                **dict(model_args, **kwargs))


@register_model
def wrn40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2: six blocks per stage, widths 32/64/128."""
    model_args = dict(depth=40, widen_factor=2)
    return build_model_with_cfg(WideResNet, "wrn40_2", pretrained, feature_cfg=dict(out_indices=(0, 1, 2)),
                                **dict(model_args, **kwargs))
