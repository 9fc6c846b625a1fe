"""How a run is spread over Ray: generator actors, Train workers, the pull feed and the weight store.

Pure pydantic (no Ray import), validated where defined, unknown keys fail, like every `muse.config`
section. Versions count student optimizer steps: rank 0 pushes its weights with `version=steps` every
`weights.push_interval` steps, and a batch's staleness is `steps − batch.student_version`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from muse.config import Section


class GeneratorsConfig(Section):
    """The GeneratorActor pool: each actor holds a teacher, a generator and label embeddings."""

    count: int = Field(2, ge=1, description="Number of GeneratorActors")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (fractions allowed, e.g. 0.25)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractional shares one GPU, e.g. 0.25")


class TrainWorkersConfig(Section):
    """The Ray Train workers that run the distillation step (DDP over the student)."""

    count: int = Field(1, ge=0, description="Train workers; 0 runs the loop in the driver (Train local mode)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Train worker")
    use_gpu: bool = Field(False, description="One GPU per Train worker")


class FeedConfig(Section):
    """The pull feed each Train worker uses to get synthetic batches from the generators."""

    in_flight: int = Field(
        2, ge=1,
        description="generate() calls each Train worker keeps in flight (K); with W workers and N actors, "
        "W·K ≥ N keeps every actor busy",
    )
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for one batch before the feed gives up")


class WeightsConfig(Section):
    """Student weights from rank 0 to the generators (for L_adv / L_aed), and what to do with stale batches."""

    push_interval: int = Field(10, ge=1, description="Rank 0 pushes the student every this many steps")
    max_staleness: int = Field(
        100, ge=0,
        description="Most student steps a batch's weights may lag the current student before it counts as stale",
    )
    on_stale: Literal["use", "drop"] = Field(
        "use", description="use: keep stale batches (they are counted); drop: discard them"
    )


class OrchestrationConfig(Section):
    """Everything about placing a run on Ray; the method itself is configured by `muse.config.RunConfig`."""

    address: str | None = Field(
        None,
        description="ray.init address: None joins the job's cluster when run under `ray job submit`, "
        "else starts a local one; 'local' always starts a new local cluster; 'auto' or host:port joins one",
    )
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig)
    train: TrainWorkersConfig = Field(default_factory=TrainWorkersConfig)
    feed: FeedConfig = Field(default_factory=FeedConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
