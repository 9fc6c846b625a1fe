"""Our architectures, registered with timm on import, and the helpers that reach their features.

After `import muse.models`, `timm.create_model(name, num_classes=K, in_chans=C)` builds any name in
`MODEL_NAMES`; the helpers in `features` work for these and for timm's own models alike.
"""

from muse.model_names import MODEL_NAMES
from muse.models import cifar_resnet, small, wrn
from muse.models.features import (
    class_activation_map,
    classifier_weight,
    embedding_dim,
    features_and_logits,
    pooled_embedding,
    supports_cam,
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
