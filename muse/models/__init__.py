"""Our architectures, registered with timm on import, and the helpers that reach their features.

After `import muse.models`, `timm.create_model(name, num_classes=K, in_chans=C)` builds any name in
`MODEL_NAMES`; the helpers in `features` work for these and for timm's own models alike.
"""

from muse.models import cifar_resnet, small, wrn
from muse.models.features import (
    class_activation_map,
    classifier_weight,
    embedding_dim,
    features_and_logits,
    pooled_embedding,
    supports_cam,
)

MODEL_NAMES: tuple[str, ...] = (
    "digits_cnn",
    "digits_cnn_half",
    "lenet5",
    "lenet5_half",
    "cifar_resnet18",
    "cifar_resnet34",
    "wrn16_2",
    "wrn40_2",
)

__all__ = [
    "MODEL_NAMES",
    "cifar_resnet",
    "class_activation_map",
    "classifier_weight",
    "embedding_dim",
    "features_and_logits",
    "pooled_embedding",
    "small",
    "supports_cam",
    "wrn",
]
