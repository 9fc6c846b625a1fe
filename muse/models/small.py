"""Small teachers and students for 1-channel digit images: a plain CNN for scikit-learn's 8×8 digits
(upsampled to 16×16) and DAFL's LeNet-5 for 32×32 MNIST. Both carry BatchNorm after every conv,
because data-free distillation matches the teacher's BN statistics."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from muse.models.defaults import dataset_cfg
from muse.models.head import Classifier, PooledLinearClassifier, init_weights

__all__ = ["DigitsCNN", "LeNet5"]  # register_model appends each entrypoint


def _conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(PooledLinearClassifier):
    """Four 3×3 conv-BN-ReLU layers, the third with stride 2, then global average pool and a linear
    classifier. Works at any input size; a 16×16 input gives an 8×8 feature map."""

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (16, 32, 64, 64),
        num_classes: int = 10,
        in_chans: int = 1,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        strides = (1, 1, 2, 1)
        chans = (in_chans, *widths)
        self.features = nn.Sequential(
            *[_conv_bn_relu(chans[i], chans[i + 1], stride=s) for i, s in enumerate(strides)]
        )
        # timm's features_only: one map per stage (the stride-2 layer starts the second)
        self.feature_info = [dict(num_chs=widths[1], reduction=1, module="features.1"),
                             dict(num_chs=widths[3], reduction=2, module="features.3")]
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class LeNet5(Classifier):
    """LeNet-5 as in DAFL: conv(5×5)-BN-ReLU-maxpool ×2, conv(5×5)-BN-ReLU, fc-ReLU, fc.

    Deviations from DAFL, for data-free distillation at several resolutions: BatchNorm after each conv,
    and "same" padding plus a global average pool before fc1, so any input ≥ 4×4 works (weight shapes
    are DAFL's). forward_features returns the conv3 map (8×8 at 32×32 input); fc1 belongs to the head,
    so `num_features` (map channels) differs from the pre-logits width `head_hidden_size`, and the
    classifier is fc2.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (6, 16, 120, 84),
        num_classes: int = 10,
        in_chans: int = 1,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, c3, hidden = widths
        self.drop_rate = drop_rate
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, c1, kernel_size=5),
            nn.MaxPool2d(2),
            _conv_bn_relu(c1, c2, kernel_size=5),
            nn.MaxPool2d(2),
            _conv_bn_relu(c2, c3, kernel_size=5),
        )
        self.feature_info = [dict(num_chs=c1, reduction=1, module="features.0"),
                             dict(num_chs=c2, reduction=2, module="features.2"),
                             dict(num_chs=c3, reduction=4, module="features.4")]
        self.num_features = c3
        self.head_hidden_size = hidden
        self._set_head(num_classes, global_pool)
        init_weights(self)

    def _set_head(self, num_classes: int, pool_type: str, **device_dtype: object) -> None:
        """Pool, fc1 and the classifier fc2. Without a pool (`pool_type=''`) fc1 and fc2 are 1×1 convs, as
        in timm's MLP heads, so `reset_classifier(0, '')` gives the unpooled [B, hidden, h, w] map."""
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.fc1 = self._dense(self.num_features * self.global_pool.feat_mult(), self.head_hidden_size, **device_dtype)
        self._set_classifier(num_classes, **device_dtype)

    def _set_classifier(self, num_classes: int, **device_dtype: object) -> None:
        self.num_classes = num_classes
        self.fc2 = self._dense(self.head_hidden_size, num_classes, **device_dtype) if num_classes > 0 else nn.Identity()

    def _dense(self, in_features: int, out_features: int, **device_dtype: object) -> nn.Module:
        if self.global_pool.pool_type:
            return nn.Linear(in_features, out_features, **device_dtype)
        return nn.Conv2d(in_features, out_features, 1, **device_dtype)

    def get_classifier(self) -> nn.Module:
        return self.fc2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)
        if global_pool is None or global_pool == self.global_pool.pool_type:
            self._set_classifier(num_classes, **dd)  # fc1 keeps its weights
        else:  # another pool changes fc1's input, so the whole head is new
            self._set_head(num_classes, global_pool, **dd)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.relu(self.fc1(self.global_pool(x)))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc2(x)


def _features(stages: int) -> dict[str, Any]:
    """timm's features_only wrapper for a model whose stages sit in one `features` Sequential."""
    return dict(flatten_sequential=True, out_indices=tuple(range(stages)))


# Input size (at the native resolution), class count and mean/std come from the dataset registry.
default_cfgs = generate_default_cfgs({
    "digits_cnn.digits": dataset_cfg("digits", pool_size=(8, 8), first_conv="features.0.0"),
    "digits_cnn_half.digits": dataset_cfg("digits", pool_size=(8, 8), first_conv="features.0.0"),
    "lenet5.mnist": dataset_cfg("mnist", pool_size=(8, 8), first_conv="features.0.0", classifier="fc2"),
    "lenet5_half.mnist": dataset_cfg("mnist", pool_size=(8, 8), first_conv="features.0.0", classifier="fc2"),
})


@register_model
def digits_cnn(pretrained: bool = False, **kwargs: Any) -> DigitsCNN:
    """Digits teacher: widths 16/32/64/64 (small enough for synthesis on a 2-core CPU)."""
    model_args = dict(widths=(16, 32, 64, 64))
    return build_model_with_cfg(DigitsCNN, "digits_cnn", pretrained, feature_cfg=_features(2), **dict(model_args, **kwargs))


@register_model
def digits_cnn_half(pretrained: bool = False, **kwargs: Any) -> DigitsCNN:
    """Digits student: half the teacher's width, 8/16/32/32."""
    model_args = dict(widths=(8, 16, 32, 32))
    return build_model_with_cfg(DigitsCNN, "digits_cnn_half", pretrained, feature_cfg=_features(2),
                                **dict(model_args, **kwargs))


@register_model
def lenet5(pretrained: bool = False, **kwargs: Any) -> LeNet5:
    """DAFL's MNIST teacher: widths 6/16/120, fc 84."""
    model_args = dict(widths=(6, 16, 120, 84))
    return build_model_with_cfg(LeNet5, "lenet5", pretrained, feature_cfg=_features(3), **dict(model_args, **kwargs))


@register_model
def lenet5_half(pretrained: bool = False, **kwargs: Any) -> LeNet5:
    """DAFL's MNIST student (LeNet-5-Half): widths 3/8/60, fc 42."""
    model_args = dict(widths=(3, 8, 60, 42))
    return build_model_with_cfg(LeNet5, "lenet5_half", pretrained, feature_cfg=_features(3), **dict(model_args, **kwargs))
