"""What our registered models share: timm's classifier face, the pooled linear head behind it, and the
conv weight init.

`Classifier` gives `forward(x) = forward_head(forward_features(x))`; subclasses supply both halves.
`PooledLinearClassifier` adds timm's usual head (global pool → optional dropout → linear `fc`), with
`get_classifier`, `reset_classifier`, `num_features` and `head_hidden_size`. The head's modules are
`global_pool` and `fc`, as in timm's own models, so state-dict keys read `fc.weight` and `fc.bias`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from torch import nn

__all__ = ["Classifier", "PooledLinearClassifier", "init_weights"]


class Classifier(nn.Module):
    """A timm-style classifier: the backbone's `forward_features`, then the head's `forward_head`."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PooledLinearClassifier(Classifier):
    """A `Classifier` whose head is a global pool, optional dropout and a linear `fc` (an identity when
    num_classes is 0). Call `_init_head` in `__init__` after building the backbone, where the head's
    modules should come in the state dict."""

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self._set_head(num_classes, global_pool)

    def _set_head(self, num_classes: int, pool_type: str, **device_dtype: object) -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=pool_type, **device_dtype
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self._set_head(num_classes, pool_type, **get_device_dtype(self))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)


def init_weights(model: nn.Module, zero_linear_bias: bool = True) -> None:
    """Kaiming-normal (fan-out, ReLU) init for every conv weight; zero every linear bias unless
    `zero_linear_bias` is False (linear weights keep torch's default init either way)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
