"""The Ray layer of muse-ray: GeneratorActor × N → (pull feed) → Train workers, student weights back
through the WeightStore. The method itself lives in `muse/` and never imports Ray."""

from muse.config import RayConfig
from orchestration.feed import GenerationFeed
from orchestration.generator_actor import GeneratorActor, create_generator_actors, wait_until_ready
from orchestration.records import record_from_dict, record_to_dict
from orchestration.weight_store import StalenessPolicy, WeightStore, create_weight_store, staleness

__all__ = [
    "GenerationFeed",
    "GeneratorActor",
    "RayConfig",
    "StalenessPolicy",
    "WeightStore",
    "create_generator_actors",
    "create_weight_store",
    "record_from_dict",
    "record_to_dict",
    "staleness",
    "wait_until_ready",
]
