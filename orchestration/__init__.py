"""The Ray layer of muse-ray: GeneratorActor × N → (pull feed) → Train workers, student weights back
through the WeightStore. The method itself lives in `muse/` and never imports Ray.

The names below are imported on first use (PEP 562): a process that needs one module, e.g. the
WeightStore actor's, then does not import torch and timm with the rest (seconds on a small machine).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationFeed": "orchestration.feed",
    "GeneratorActor": "orchestration.generator_actor",
    "RayConfig": "muse.config",
    "StalenessPolicy": "orchestration.weight_store",
    "WeightStore": "orchestration.weight_store",
    "create_generator_actors": "orchestration.generator_actor",
    "create_weight_store": "orchestration.weight_store",
    "record_from_dict": "orchestration.records",
    "record_to_dict": "orchestration.records",
    "staleness": "orchestration.weight_store",
    "wait_until_ready": "orchestration.generator_actor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestration' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
