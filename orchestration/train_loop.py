"""The Ray Train worker: the shared epochs (`muse.loop.run_epochs`) with synthetic batches pulled from
the generator actors (`FeedSource`), the student distilled with DDP over the workers, and the Ray
concerns as hooks (`RayWorkerHooks`): weight pushes to the WeightStore, reports and checkpoints to
Ray Train, rank-0 console lines and MLflow logging with synthesis counts summed over every rank.

Generation never waits for distillation: the feed keeps K calls in flight while the student trains.
Checkpoints use the format of `muse.checkpoint`, shared with the single-process engine.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.actor import ActorHandle

from muse.checkpoint import commit_local_checkpoint, restore, write_checkpoint
from muse.config import RunConfig
from muse.data import DatasetInfo, load_dataset
from muse.distillation import Distiller
from muse.embeddings import label_embeddings
from muse.evaluate import accuracy
from muse.loop import (EpochHooks, RunState, SynthesisTally, build_distiller, episodes_to_take, run_epochs,
                       teacher_accuracy)
from muse.pool import SyntheticPool
from muse.synthesis import SynthesisRecord
from muse.teacher import load_teacher
from muse.tracking import MlflowTracker, Tracker, epoch_metrics
from orchestration.feed import GenerationFeed
from orchestration.weight_store import StalenessPolicy, state_to_numpy


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Train worker. `loop_config`: run (RunConfig as JSON dict), generators
    (actor handles), weight_store (actor name), first_calls (optional: per rank, the first episodes the
    driver submitted, `submit_first_episodes`), stop_after_epoch (optional, for staged runs), resume_from
    (optional Checkpoint), tracking (optional MLflow run handle that rank 0 logs each epoch to),
    checkpoint_epochs (optional: epochs checkpointed besides every `checkpoint_every` and the last)."""
    entered_at = time.time()  # start-up accounting: the worker process is up and has imported this module
    cfg = RunConfig.model_validate(loop_config["run"])
    _set_report_log_level(cfg.ray.train.log_level)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    actors: list[ActorHandle] = loop_config["generators"]

    # This Train run's latest checkpoint (Ray Train restores it from output_dir's snapshot, and after a
    # worker-group restart), else the one the driver was asked to resume from.
    checkpoint: ray.train.Checkpoint | None = ray.train.get_checkpoint() or loop_config.get("resume_from")
    end_epoch = loop_config.get("stop_after_epoch") or cfg.total_epochs
    feed: GenerationFeed | None = None
    if checkpoint is None and cfg.synthesis.warmup > 0:
        # A fresh run's first episodes (warm-up: no student in them) need nothing from this worker: the
        # driver submitted the first ones as the actors started, and the rest go out now, while this
        # worker loads the data, the teacher and the student.
        first_calls = loop_config.get("first_calls") or [[] for _ in range(world)]
        feed = GenerationFeed(actors, cfg.ray.feed.in_flight, rank=rank, world_size=world,
                              limit=episodes_to_take(cfg, 0, end_epoch, world)).adopt(first_calls[rank]).start()
    try:
        splits = load_dataset(cfg.data)
        info = splits.info
        teacher, teacher_meta = load_teacher(cfg.teacher_checkpoint, cfg.teacher.arch, info)
        embeddings = label_embeddings(cfg.embedding, teacher, info.num_classes, cfg.seed)
        distiller = build_distiller(cfg, info, teacher, embeddings, device,
                                    parallel=ray.train.torch.prepare_model if world > 1 else None)
        pool = SyntheticPool(cfg.pool.capacity)
        state, next_episode, teacher_acc = RunState.fresh(cfg.seed, rank), 0, None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state, saved, ranks = restore(Path(directory), rank, distiller, pool)
            teacher_acc = saved.teacher_acc
            # Episode numbers name pool shards: continue past every number any rank handed out, consumed or not.
            next_episode = max(r["source"]["start_episode"] + r["source"]["issued"] * r["source"]["world_size"]
                               for r in ranks.values())
            if rank == 0:
                ray.get([actor.set_state.remote(s) for actor, s in zip(actors, saved.generators)])
        elif rank == 0:
            teacher_acc = teacher_accuracy(teacher_meta, teacher, splits.test, cfg, device)
        weight_store = ray.get_actor(loop_config["weight_store"])
        if rank == 0:  # after a worker-group restart the store holds the lost group's newer student: go back
            restored = state_to_numpy(distiller.student.state_dict()) if distiller.steps > 0 else None
            ray.get(weight_store.reset.remote(restored, distiller.steps))
        if world > 1:
            torch.distributed.barrier()  # no rank asks for a batch before the store is reset

        feed = feed or GenerationFeed(actors, cfg.ray.feed.in_flight, rank=rank, world_size=world,
                                      start_episode=next_episode, epoch=state.epoch,
                                      adversarial=state.epoch >= cfg.synthesis.warmup,
                                      limit=episodes_to_take(cfg, state.epoch, end_epoch, world))
        policy = StalenessPolicy.from_config(cfg.ray.weights)
        source = FeedSource(feed, policy, distiller, world, cfg.ray.feed.timeout_s)
        # Rank 0 logs each evaluation as it happens (Ray's rank-zero-only pattern); the driver owns the run.
        tracking = loop_config.get("tracking")
        tracker = MlflowTracker.attach(tracking if rank == 0 else None)
        hooks = RayWorkerHooks(cfg, rank, world, actors, weight_store, feed, policy,
                               distiller, pool, tracker, teacher=teacher, info=info,
                               teacher_acc=teacher_acc, entered_at=entered_at,
                               checkpoint_epochs=loop_config.get("checkpoint_epochs", ()))

        def evaluate(model: torch.nn.Module) -> float:
            return accuracy(model, splits.test, cfg.data.eval_batch_size, device)

        hooks.loop_started_at = time.time()
        run_epochs(cfg, state, source, distiller, pool, evaluate if rank == 0 else None, hooks,
                   loop_config.get("stop_after_epoch"))
    finally:
        if feed is not None:
            feed.close()


class FeedSource:
    """A Train worker's episodes, pulled from the generator actors (the loop takes this worker's share of
    each epoch); a batch too stale for the staleness policy is counted but kept out of the pool."""

    def __init__(self, feed: GenerationFeed, policy: StalenessPolicy, distiller: Distiller, world: int,
                 timeout_s: float) -> None:
        self.feed, self.policy, self.distiller = feed, policy, distiller
        self.world, self.timeout_s = world, timeout_s

    def episodes(self, epoch: int, adversarial: bool) -> Iterator[tuple[SynthesisRecord, bool]]:
        self.feed.set_phase(epoch, adversarial=adversarial)

        def pull() -> Iterator[tuple[SynthesisRecord, bool]]:
            while True:
                record = self.feed.next_record(self.timeout_s)
                yield record, self.policy.admit(self.distiller.steps, record.student_version)

        return pull()


class RayWorkerHooks(EpochHooks):
    """Rank 0 pushes the student to the WeightStore (at the first KD step and every `push_interval`
    steps), prints one line per epoch and logs each evaluation; every rank polls its feed after each KD
    step and each epoch (finished calls replaced at once), and reports each epoch to Ray Train, with a
    checkpoint every `checkpoint_every` epochs, at `checkpoint_epochs` and at the last (or stop) epoch."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, actors: list[ActorHandle], weight_store: ActorHandle,
                 feed: GenerationFeed, policy: StalenessPolicy, distiller: Distiller, pool: SyntheticPool,
                 tracker: Tracker, *, teacher: torch.nn.Module, info: DatasetInfo,
                 teacher_acc: float | None, entered_at: float | None = None,
                 checkpoint_epochs: Iterable[int] = ()) -> None:
        self.cfg, self.rank, self.world, self.actors, self.weight_store = cfg, rank, world, actors, weight_store
        self.feed, self.policy, self.distiller, self.pool = feed, policy, distiller, pool
        self.tracker, self.teacher, self.info = tracker, teacher, info
        self.teacher_acc = teacher_acc
        self.entered_at = entered_at
        self.checkpoint_epochs = set(checkpoint_epochs)
        self.loop_started_at: float | None = None
        self.last_run_tally = SynthesisTally()

    def before_kd(self, distiller: Distiller) -> None:
        if self.rank == 0 and distiller.steps == 0:
            self._push()

    def after_kd_step(self, distiller: Distiller) -> None:
        if self.rank == 0 and distiller.steps % self.cfg.ray.weights.push_interval == 0:
            self._push()
        self.feed.poll()  # an actor whose call finished during this step starts its next one now

    def _push(self) -> None:
        # Fire and forget: the store keeps only newer versions, and generators pull when they start a call.
        self.weight_store.push.remote(state_to_numpy(self.distiller.student.state_dict()), self.distiller.steps)

    def after_epoch(self, epoch: int, metrics: dict[str, Any], state: RunState, last: bool) -> None:
        self.feed.poll()  # before the report and checkpoint, which the actors need not wait for
        feed_metrics = self.feed.metrics()
        metrics |= {"feed_wait_s": feed_metrics["wait_s"], "actor_failures": feed_metrics["actor_failures"],
                    "loop_s": state.loop_s,
                    **{f"staleness_{k}": v for k, v in self.policy.metrics().items()},
                    "teacher_acc": self.teacher_acc if self.teacher_acc is not None else float("nan")}
        evaluated = metrics["phase"] == "distill"
        if self.rank == 0:
            accuracy_text = f" student {metrics['student_acc']:.2f}%," if "student_acc" in metrics else ""
            # Not print(): Ray Train patches it to log and echo, which shows every line twice.
            sys.stdout.write(f"[muse] epoch {epoch}/{self.cfg.total_epochs} {metrics['phase']}: pool "
                             f"{metrics['pool']}, kd steps {metrics['kd_steps']},{accuracy_text} feed wait "
                             f"{metrics['feed_wait_s']:.1f}s, {metrics['epoch_s']:.1f}s\n")
            sys.stdout.flush()
            if evaluated:
                self._log_evaluation(epoch, metrics, state, self.last_run_tally)
        if last or state.epoch % self.cfg.checkpoint_every == 0 or state.epoch in self.checkpoint_epochs:
            self._report_with_checkpoint(metrics, state)
        else:
            ray.train.report(metrics)

    def run_tally(self, tally: SynthesisTally) -> SynthesisTally:
        if self.world > 1:  # a collective: every rank reaches it at each evaluated epoch
            gathered: list[dict[str, Any] | None] = [None] * self.world
            torch.distributed.all_gather_object(gathered, tally.as_dict())
            tally = SynthesisTally.total(t for t in gathered if t)
        self.last_run_tally = tally
        return tally

    def _log_evaluation(self, epoch: int, metrics: dict[str, Any], state: RunState, tally: SynthesisTally) -> None:
        """Synthesis counts (`tally`) are every rank's; episodes, feed wait, staleness and the pictures
        are rank 0's own."""
        logged = epoch_metrics(state.history[-1], tally)
        logged |= {k: v for k, v in metrics.items() if k.startswith(("staleness_", "feed_")) or k in ("epoch_s", "episodes")}
        if state.loop_s > 0:
            logged["feed_images_per_s"] = sum(tally.images.values()) / state.loop_s
        self.tracker.log_epoch(epoch, logged)
        self.tracker.log_visuals(epoch, self.pool.latest_by_resolution(), self.teacher, self.info,
                                 self.cfg.resolution.teacher_input)

    def _report_with_checkpoint(self, metrics: dict[str, Any], state: RunState) -> None:
        generators = ray.get([actor.get_state.remote() for actor in self.actors]) if self.rank == 0 else None

        def write(folder: Path) -> None:
            write_checkpoint(folder, self.rank, self.cfg, state, self.distiller, self.pool,
                             source_state=feed_state(self.feed) | {"staleness": self.policy.metrics(),
                                                                   "worker_started_at": self.entered_at,
                                                                   "loop_started_at": self.loop_started_at},
                             generators=generators, teacher_acc=self.teacher_acc)

        if self.cfg.ray.train.count == 0:
            # Train's local mode (the loop in the driver) keeps only the last reported checkpoint object and
            # persists nothing: commit it in output_dir the way the single-process engine does.
            committed = commit_local_checkpoint(self.cfg.output_dir, state.epoch, write)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(committed)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def feed_state(feed: GenerationFeed) -> dict[str, Any]:
    """A feed's episode numbering (a resumed run numbers on past it) and counters, for a checkpoint."""
    return {"issued": feed.issued, "start_episode": feed.start_episode, "world_size": feed.world_size,
            "feed": feed.metrics(), "first_episode_at": feed.first_episode_at, "first_record_at": feed.first_record_at}


def _set_report_log_level(level: str) -> None:
    # Ray Train logs every report (its whole metrics dict, from each rank) at INFO through a logger named
    # after its file path, which the "ray.train" level of LoggingConfig does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(level)
