"""timm default configs for our models, built from the dataset each model is for (`muse.datasets`).

Each cfg is registered under `<arch>.<dataset>`: timm's pretrained tag names the dataset, as in
`resnet50.tv_in1k`, so `timm.get_pretrained_cfg(arch).tag` says which registry entry a model follows.
"""

from __future__ import annotations

from typing import Any

from muse.datasets import get_dataset

__all__ = ["dataset_cfg"]


def dataset_cfg(dataset: str, **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg for a model of registered `dataset`: input size at the native resolution,
    class count and mean/std from the registry; `kwargs` add the architecture's own entries (`pool_size`,
    `first_conv`, `classifier`)."""
    spec = get_dataset(dataset)
    facts: dict[str, Any] = {
        "input_size": (spec.channels, spec.native_resolution, spec.native_resolution),
        "mean": spec.mean,
        "std": spec.std,
    }
    if spec.num_classes is not None:
        facts["num_classes"] = spec.num_classes
    return {"url": "", "crop_pct": 1.0, "interpolation": "bilinear", "classifier": "fc", **facts, **kwargs}
