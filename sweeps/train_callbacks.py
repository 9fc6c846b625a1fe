"""The Ray Train callbacks of a sweep's trials. A module of its own: the Train controller process
unpickles them, and `sweeps.trial` would bring the method's models (torch, timm) into that process with
it, about 1.6 s of every Train run's start-up on two cores (a PBT trial starts one per exploit)."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.queue import Queue


class EvaluationReportCallback(TuneReportCallback):
    """Forwards each evaluated epoch's rank-0 metrics to Tune, with its count of `evaluations`, except
    the last: the trial reports that itself once its outputs are written, since Tune may end a trial's
    process at any report. Warm-up epochs have no accuracy yet, and Tune rejects a result without the
    sweep's metric."""

    def __init__(self, metric: str, warmup: int, last_epoch: int) -> None:
        super().__init__()
        self.metric, self.warmup, self.last_epoch = metric, warmup, last_epoch

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.metric in metrics[0] and metrics[0]["epoch"] < self.last_epoch:  # epochs count from 1
            evaluations = metrics[0]["epoch"] - self.warmup
            super().after_report(run_context, [metrics[0] | {"evaluations": evaluations}, *metrics[1:]], checkpoint)


class BoundaryCheckpointCallback(UserCallback):
    """In the Train controller: passes each committed checkpoint of a boundary epoch, with its rank-0
    metrics, to the trial's thread (Ray Train's Tune callback passes metrics only, and PBT clones
    checkpoints)."""

    def __init__(self, queue: Queue, boundaries: list[int]) -> None:
        self.queue, self.boundaries = queue, set(boundaries)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None and metrics[0].get("epoch") in self.boundaries:
            self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint.path})
