"""The Ray Train worker loop: pull synthetic batches from the generator actors, distil the student
(DDP over the workers), evaluate, report metrics and checkpoints.

Same epoch structure as `muse.engine`: warm-up epochs only fill the pool; later epochs take
`g_loops` fresh batches (split over the workers), run `kd_steps` student steps on pool batches, and
evaluate on the real test split. Generation never waits for distillation: the feed keeps K calls in
flight while the student trains.

A checkpoint holds everything a resume needs: `state.pt` (student, optimizer, scheduler, generator
actor states, RNG, counters, history, config) from rank 0, and each rank's pool as Parquet shards in
`pool-rank<r>/` with its feed counter in `rank<r>.json`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.actor import ActorHandle

from muse.config import RunConfig
from muse.data import DatasetInfo, load_dataset
from muse.distillation import Distiller
from muse.embeddings import label_embeddings
from muse.engine import SynthesisTally, draw_batch, epoch_metrics, latest_records, seed_everything
from muse.evaluate import accuracy
from muse.pool import SyntheticPool
from muse.student import StudentNet
from muse.teacher import load_teacher
from muse.tracking import MlflowTracker, NullTracker
from orchestration.feed import GenerationFeed
from orchestration.weight_store import StalenessPolicy, state_to_numpy

STATE_FILE = "state.pt"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Train worker. `loop_config`: run (RunConfig as JSON dict), generators
    (actor handles), weight_store (actor name), stop_after_epoch (optional, for staged runs), resume_from
    (optional Checkpoint), tracking (optional MLflow run handle that rank 0 logs each epoch to)."""
    cfg = RunConfig.model_validate(loop_config["run"])
    _set_report_log_level(cfg.ray.train.log_level)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    actors: list[ActorHandle] = loop_config["generators"]
    weight_store = ray.get_actor(loop_config["weight_store"])

    splits = load_dataset(cfg.data)
    info = splits.info
    teacher, teacher_meta = load_teacher(cfg.teacher_checkpoint, cfg.teacher.arch, info)
    embeddings = label_embeddings(cfg.embedding, teacher, info.num_classes, cfg.seed)
    seed_everything(cfg.seed)  # every rank builds the same initial student
    student = StudentNet(cfg.student.arch, info.num_classes, info.in_chans, embeddings.shape[1])
    distiller = Distiller(cfg, student, teacher, embeddings, info.mean, info.std, info.resolution,
                          cfg.distill.epochs * cfg.distill.kd_steps, device,
                          parallel=ray.train.torch.prepare_model if world > 1 else None)
    pool = SyntheticPool(cfg.pool.capacity)
    # This Train run's latest checkpoint (Ray Train restores it from output_dir's snapshot, and after a
    # worker-group restart), else the one the driver was asked to resume from.
    state = _restore(ray.train.get_checkpoint() or loop_config.get("resume_from"), rank, distiller, pool, actors)
    policy = StalenessPolicy.from_config(cfg.ray.weights)
    sample_rng = np.random.default_rng([cfg.seed, rank, state["epoch"]])
    total_epochs = cfg.total_epochs
    stop_after = loop_config.get("stop_after_epoch")
    teacher_acc = teacher_meta.get("test_acc")
    if teacher_acc is None and rank == 0:
        teacher_acc = accuracy(teacher.to(device), splits.test, cfg.data.eval_batch_size, device)

    feed = GenerationFeed(actors, cfg.ray.feed.in_flight, rank=rank, world_size=world,
                          start_episode=state["next_episode"], epoch=state["epoch"],
                          adversarial=state["epoch"] >= cfg.synthesis.warmup)
    # Rank 0 logs each evaluation as it happens (Ray's rank-zero-only pattern); the driver owns the run.
    tracking = loop_config.get("tracking")
    tracker = MlflowTracker.attach(tracking if rank == 0 else None)
    record = None
    loop_origin = time.perf_counter() - state["loop_s"]  # loop time counts reports and checkpoints too
    try:
        for epoch in range(state["epoch"], total_epochs):
            started = time.perf_counter()
            warming_up = epoch < cfg.synthesis.warmup
            feed.set_phase(epoch, adversarial=not warming_up)
            loops = cfg.synthesis.gwp_loops if warming_up else cfg.synthesis.g_loops
            for _ in range(math.ceil(loops / world)):
                record = feed.next_record(cfg.ray.feed.timeout_s)
                if policy.admit(distiller.steps, record.student_version):
                    pool.add(record)
                    state["tally"].add(record)
                state["episodes"] += 1
            metrics: dict[str, Any] = {"epoch": epoch, "phase": "warmup" if warming_up else "distill",
                                       "pool": len(pool), "kd_steps": distiller.steps}
            if not warming_up:
                if rank == 0 and distiller.steps == 0:
                    _push(weight_store, distiller)
                losses: dict[str, float] = {}
                for _ in range(cfg.distill.kd_steps):
                    losses = distiller.step(draw_batch(pool, cfg, sample_rng))
                    if rank == 0 and distiller.steps % cfg.ray.weights.push_interval == 0:
                        _push(weight_store, distiller)
                metrics |= {f"loss_{k}": v for k, v in losses.items()} | {"lr": distiller.lr}
                metrics["kd_steps"] = distiller.steps
                if rank == 0:
                    metrics["student_acc"] = accuracy(distiller.student.backbone, splits.test,
                                                      cfg.data.eval_batch_size, device)
                    state["history"].append({"epoch": epoch, "student_acc": metrics["student_acc"], "lr": distiller.lr,
                                             **{f"loss_{k}": v for k, v in losses.items()},
                                             "synthesis_loss": record.losses if record else {},
                                             "pool": len(pool)})
            feed_metrics = feed.metrics()
            epoch_s = time.perf_counter() - started
            state["loop_s"] = time.perf_counter() - loop_origin
            metrics |= {"episodes": state["episodes"], "epoch_s": epoch_s,
                        "feed_wait_s": feed_metrics["wait_s"], "actor_failures": feed_metrics["actor_failures"],
                        **{f"staleness_{k}": v for k, v in policy.metrics().items()},
                        "teacher_acc": teacher_acc if teacher_acc is not None else float("nan")}
            tally = state["tally"]
            if world > 1 and tracking and not warming_up:
                tally = _tally_over_ranks(tally, world)
            if rank == 0:
                accuracy_text = f" student {metrics['student_acc']:.2f}%" if "student_acc" in metrics else ""
                # Not print(): Ray Train patches it to log and echo, which shows every line twice.
                sys.stdout.write(f"[muse] epoch {epoch + 1}/{total_epochs} {metrics['phase']}: pool {len(pool)}, "
                                 f"kd steps {distiller.steps},{accuracy_text} feed wait "
                                 f"{metrics['feed_wait_s']:.1f}s, {metrics['epoch_s']:.1f}s\n")
                sys.stdout.flush()
                if not warming_up:
                    _log_evaluation(tracker, epoch, metrics, state, tally, pool, teacher, info, cfg)
            last = epoch == total_epochs - 1 or epoch == stop_after
            state["epoch"] = epoch + 1
            if last or (epoch + 1) % cfg.ray.train.checkpoint_every == 0:
                _report_with_checkpoint(metrics, cfg, rank, state, distiller, pool, feed, actors, teacher_acc)
            else:
                ray.train.report(metrics)
            if epoch == stop_after:
                break
    finally:
        feed.close()


def _log_evaluation(tracker: NullTracker, epoch: int, metrics: dict[str, Any], state: dict[str, Any],
                    tally: SynthesisTally, pool: SyntheticPool, teacher: torch.nn.Module, info: DatasetInfo,
                    cfg: RunConfig) -> None:
    """An evaluation epoch as rank 0 logs it: synthesis counts (`tally`) are every rank's; episodes,
    feed wait, staleness and the pictures are rank 0's own."""
    logged = epoch_metrics(state["history"][-1], tally)
    logged |= {k: v for k, v in metrics.items() if k.startswith(("staleness_", "feed_")) or k in ("epoch_s", "episodes")}
    if state["loop_s"] > 0:
        logged["feed_images_per_s"] = sum(tally.images.values()) / state["loop_s"]
    tracker.log_epoch(epoch, logged)
    tracker.log_visuals(epoch, latest_records(pool), teacher, info, cfg.resolution.teacher_input)


def _tally_over_ranks(tally: SynthesisTally, world: int) -> SynthesisTally:
    """The synthesis tally summed over every Train worker (a collective: every rank must call it)."""
    gathered: list[dict[str, Any] | None] = [None] * world
    torch.distributed.all_gather_object(gathered, tally.as_dict())
    return SynthesisTally.total(t for t in gathered if t)


def _set_report_log_level(level: str) -> None:
    # Ray Train logs every report (its whole metrics dict, from each rank) at INFO through a logger named
    # after its file path, which the "ray.train" level of LoggingConfig does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(level)


def _push(weight_store: ActorHandle, distiller: Distiller) -> None:
    # Fire and forget: the store keeps only newer versions, and generators pull when they start a call.
    weight_store.push.remote(state_to_numpy(distiller.student.state_dict()), distiller.steps)


def _report_with_checkpoint(metrics: dict[str, Any], cfg: RunConfig, rank: int, state: dict[str, Any],
                            distiller: Distiller, pool: SyntheticPool, feed: GenerationFeed,
                            actors: list[ActorHandle], teacher_acc: float | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        pool.save(directory / f"pool-rank{rank}")
        (directory / f"rank{rank}.json").write_text(json.dumps(
            {"issued": feed.issued, "start_episode": feed.start_episode, "world_size": feed.world_size,
             "episodes": state["episodes"], "tally": state["tally"].as_dict(), "loop_s": state["loop_s"],
             "feed": feed.metrics()}))
        if rank == 0:
            generator_states = ray.get([actor.get_state.remote() for actor in actors])
            torch.save({
                "config": cfg.model_dump(mode="json"), "epoch": state["epoch"],
                "distiller": distiller.state_dict(), "generators": generator_states,
                "history": state["history"], "teacher_acc": teacher_acc,
                "torch_rng": torch.get_rng_state(),
            }, directory / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """Rank 0's `state.pt` of a checkpoint: config, epoch, history, student, generators, counters."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _restore(checkpoint: ray.train.Checkpoint | None, rank: int, distiller: Distiller, pool: SyntheticPool,
             actors: list[ActorHandle]) -> dict[str, Any]:
    """Counters for a fresh run, or everything loaded back from `checkpoint`."""
    state: dict[str, Any] = {"epoch": 0, "episodes": 0, "next_episode": 0, "history": [], "loop_s": 0.0,
                             "tally": SynthesisTally()}
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as tmp:
        directory = Path(tmp)
        saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        distiller.load_state_dict(saved["distiller"])
        torch.set_rng_state(saved["torch_rng"])
        ranks = {p.stem: json.loads(p.read_text()) for p in directory.glob("rank*.json")}
        # Episode numbers name pool shards: continue past every number any rank handed out, consumed or not.
        state["next_episode"] = max(r["start_episode"] + r["issued"] * r["world_size"] for r in ranks.values())
        mine = ranks.get(f"rank{rank}", {"episodes": 0, "tally": SynthesisTally().as_dict(), "loop_s": 0.0})
        shards = directory / f"pool-rank{rank}"
        if shards.is_dir():
            for record in SyntheticPool.load(shards, pool.capacity).records:
                pool.add(record)
        if rank == 0:
            ray.get([actor.set_state.remote(s) for actor, s in zip(actors, saved["generators"])])
        state |= {"epoch": saved["epoch"], "episodes": mine["episodes"], "loop_s": mine["loop_s"],
                  "history": saved["history"],
                  "tally": SynthesisTally.from_dict(mine["tally"])}
    return state
