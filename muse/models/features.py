"""The one way the rest of MUSE reaches inside a classifier: feature maps, pooled embeddings, the
classifier weights and class activation maps.

Everything here relies only on timm's model face (`forward_features`, `forward_head(x, pre_logits)`,
`get_classifier`, `num_features`, `head_hidden_size`), so it works alike for our registered models and
for timm's own, e.g. `timm.create_model("resnet50", num_classes=10)`. Pass the bare model, not one
wrapped by DistributedDataParallel (reach it through `.module`).

Class activation maps (used by MUSE's key-region loss) are only meaningful when the logits are a linear
map of the average-pooled last feature map: logit_k = Σ_c W[k, c]·mean_hw A_c + b_k, so
Σ_c W[k, c]·A_c(h, w) says where the evidence for class k lies. `supports_cam` checks that structure.
LeNet-5 fails it (a hidden fc layer sits between the pooled map and the classifier), as do timm models
whose head normalises or projects after pooling (ConvNeXt, ViT, MobileNetV3).
"""

from __future__ import annotations

import torch
from torch import nn


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning (last feature map [B, C, h, w], logits [B, K])."""
    feature_map = model.forward_features(x)
    return feature_map, model.forward_head(feature_map)


def pooled_embedding(model: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """The pre-logits embedding [B, embedding_dim(model)] for a map from `features_and_logits`."""
    return model.forward_head(feature_map, pre_logits=True)


def embedding_dim(model: nn.Module) -> int:
    """Width of `pooled_embedding`: the classifier's input width. This is `head_hidden_size` when the
    head has layers before the classifier (LeNet-5's fc1), else `num_features`."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def classifier_weight(model: nn.Module) -> torch.Tensor:
    """The final linear layer's weight [K, embedding_dim(model)] (not detached)."""
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.get_classifier() is {type(classifier).__name__}, not nn.Linear; "
            "a model built with num_classes=0 has no classifier weight"
        )
    return classifier.weight


def supports_cam(model: nn.Module) -> bool:
    """Whether the logits are a linear classifier applied directly to the average-pooled last feature
    map, which `class_activation_map` assumes (see the module docstring)."""
    classifier = model.get_classifier()
    pool = getattr(model, "global_pool", None)
    return (
        isinstance(classifier, nn.Linear)
        and getattr(pool, "pool_type", None) in ("avg", "fast", "fastavg")
        and classifier.in_features == model.num_features
        and embedding_dim(model) == model.num_features
    )


def class_activation_map(
    feature_map: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """CAM [B, h, w] for class `labels[b]` of image b: ReLU(Σ_c W[y, c]·A_c), divided by its per-image
    maximum (+1e-8) so it peaks at 1 (an all-zero map stays zero). Differentiable in all inputs.

    Args:
        feature_map: last feature map A [B, C, h, w].
        weight: classifier weight W [K, C], e.g. `classifier_weight(model)`.
        labels: class index per image [B].
    """
    if feature_map.ndim != 4 or weight.ndim != 2 or weight.shape[1] != feature_map.shape[1]:
        raise ValueError(
            f"class_activation_map needs a [B, C, h, w] map and a [K, C] weight; got "
            f"{tuple(feature_map.shape)} and {tuple(weight.shape)}"
        )
    cam = torch.einsum("bc,bchw->bhw", weight[labels].to(feature_map.dtype), feature_map).relu()
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    return cam / (peak + 1e-8)
