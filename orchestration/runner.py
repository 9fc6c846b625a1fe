"""The Ray run behind `python orchestration/run.py` (whose command line is `orchestration.cli`), on a
cluster already joined: start the generator actors and the weight store, fit a Ray Train `TorchTrainer`
running `train_loop_per_worker`, and summarise the run from its final checkpoint. Importing it changes
nothing (no environment, no sys.path).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import ray.train
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from muse.checkpoint import LOCAL_POINTER, latest_checkpoint, prepare_output_dir, read_ranks, read_saved_run
from muse.config import ConfigError, RunConfig
from muse.data import DatasetInfo, load_dataset
from muse.errors import RunInterrupted
from muse.loop import SynthesisTally, episodes_of_epoch
from muse.outputs import build_summary, save_outputs
from muse.runtime import resolve_device
from muse.synthesis import applicable_key_region
from muse.teacher import ensure_teacher
from muse.tracking import Tracker, check_store, finish_tracking, run_tracker
from orchestration.commit_pointer import CommitPointer
from orchestration.feed import submit_first_episodes
from orchestration.generator_actor import create_generator_actors, wait_until_ready
from orchestration.threads import start_thread
from orchestration.train_loop import train_loop_per_worker
from orchestration.weight_store import create_weight_store, wait_until_store_ready


def run(cfg: RunConfig, checkpoint: ray.train.Checkpoint | None = None, stop_after_epoch: int | None = None,
        *, tracker: Tracker | None = None, callbacks: Sequence[UserCallback] = (),
        overwrite: bool = False, checkpoint_epochs: Sequence[int] = ()) -> dict[str, Any]:
    """Train the teacher if needed, start the generators and the weight store, fit the TorchTrainer,
    and write the summary. Ray must be initialised.

    Without `tracker` the run opens its own MLflow run and closes it; a caller that passes one (a sweep
    trial, which may fit several segments into one run) logs the final files and closes it itself.
    `callbacks` are Ray Train callbacks (e.g. the Tune report callback of a sweep); `checkpoint_epochs`
    are epochs that get a checkpoint besides every `checkpoint_every` and the last (a PBT trial's
    segment boundaries)."""
    started, started_at = time.perf_counter(), time.time()
    cfg = cfg.model_copy(update={"output_dir": cfg.output_dir.resolve()})
    prepare_output_dir(cfg.output_dir, fresh=checkpoint is None, overwrite=overwrite)
    if tracker is None:
        check_store(cfg)  # an unreachable tracking server fails here, before the teacher is trained
    splits = load_dataset(cfg.data)
    teacher, _ = ensure_teacher(cfg, splits, resolve_device("cpu" if cfg.device == "auto" else cfg.device))
    cfg = applicable_key_region(cfg, teacher, splits.info.in_chans, splits.info.resolution)
    owns_tracker = tracker is None
    # Start-up overlaps: the actors start (import torch, load the teacher) while this process opens the
    # MLflow run and the Train workers start; the actors' readiness is checked while fit() runs.
    store_name = f"muse-weights-{uuid.uuid4().hex[:8]}"
    store = create_weight_store(store_name, wait=False)  # checked with the actors, while fit() runs
    g = cfg.ray.generators
    actors = create_generator_actors(cfg, g.count, g.num_cpus, g.num_gpus, store_name, splits.info,
                                     resources=g.resources)
    # Queued on the actors now, run as soon as each is up; the refs stay ours until the run ends.
    first, per_epoch = first_episodes_per_rank(cfg) if checkpoint is None else (0, 1)
    first_calls = submit_first_episodes(actors, cfg.ray.train.count or 1, first, per_epoch)
    interrupted = False
    actors_ready_at = 0.0
    try:
        if tracker is None:  # a resumed run's MLflow run starts with the epochs before the resume
            with contextlib.nullcontext(None) if checkpoint is None else checkpoint.as_directory() as directory:
                tracker = run_tracker(cfg, [] if directory is None else read_saved_run(Path(directory)).history)
        t = cfg.ray.train
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": cfg.model_dump(mode="json"), "generators": actors,
                               "weight_store": store_name, "first_calls": first_calls,
                               "stop_after_epoch": stop_after_epoch,
                               "checkpoint_epochs": list(checkpoint_epochs), "resume_from": checkpoint,
                               "tracking": tracker.handle},
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.count, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": t.cpus_per_worker, **t.resources}),
            run_config=ray.train.RunConfig(name=cfg.output_dir.name, storage_path=str(cfg.output_dir.parent),
                                           failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                                           callbacks=[CommitPointer(cfg.output_dir / LOCAL_POINTER), *callbacks],
                                           logging_config=ray.train.LoggingConfig(log_level=t.log_level)),
        )

        def actors_ready() -> None:
            nonlocal actors_ready_at
            wait_until_store_ready(store)
            # A constructor error (e.g. an unreadable teacher) is raised here. The pings queue behind the
            # first episodes: each actor says when it was up.
            actors_ready_at = max(ping["ready_at"] for ping in wait_until_ready(actors))

        result = fit_interruptibly(trainer, while_fitting=actors_ready)
        if result.error is not None:
            raise RuntimeError(f"distillation failed: {result.error}") from result.error
    except KeyboardInterrupt:  # Ctrl+C: keep what the last committed checkpoint holds
        if not owns_tracker:  # a sweep's trial: the sweep handles its own stop
            raise
        interrupted = True
    except BaseException:
        if owns_tracker and tracker is not None:
            tracker.finish([], status="FAILED")  # whatever stopped the run, its MLflow run says so
        raise
    finally:
        # After Ctrl+C the Train workers still run (the controller is not ours to stop): killing the actors
        # they call would fill the console with their tracebacks. The process exits next, and its actors,
        # the controller and the workers go with it (and with the cluster, if it started one).
        if not interrupted:
            for actor in [*actors, store]:
                ray.kill(actor)
    if interrupted:
        summary = summarize_interrupted(cfg, time.perf_counter() - started, splits.info)
        if summary is None:
            tracker.finish([], status="KILLED")
        else:
            finish_tracking(tracker, cfg, summary, step=summary["epochs_done"], status="KILLED")
        raise RunInterrupted(summary)
    summary = summarize(cfg, result.checkpoint, time.perf_counter() - started, splits.info,
                        start_marks=(started_at, actors_ready_at))
    if owns_tracker:
        finish_tracking(tracker, cfg, summary, step=summary["epochs_done"])
    return summary


FIRST_EPISODES_PER_ACTOR = 4  # about the Train workers' start-up (10-20 s here) at a few seconds a CPU episode


def first_episodes_per_rank(cfg: RunConfig) -> tuple[int, int]:
    """How many of each Train rank's warm-up episodes the driver submits, and how many a warm-up epoch
    takes per rank: up to FIRST_EPISODES_PER_ACTOR per generator actor, enough to keep the actors busy
    until the Train workers are up, without holding many batches in the object store."""
    if cfg.synthesis.warmup == 0:
        return 0, 1
    world = cfg.ray.train.count or 1
    per_epoch = episodes_of_epoch(cfg, 0, world)
    assert per_epoch is not None  # a warm-up epoch's count never depends on a budget
    per_rank_actors = math.ceil(cfg.ray.generators.count / world)
    return min(cfg.synthesis.warmup * per_epoch, FIRST_EPISODES_PER_ACTOR * per_rank_actors), per_epoch


def fit_interruptibly(trainer: TorchTrainer, while_fitting: Callable[[], None] = lambda: None) -> ray.train.Result:
    """`trainer.fit()` with `while_fitting` run beside it (its error is raised).

    From the main thread fit() runs in a helper thread, and this thread runs `while_fitting` (an error
    there is raised at once; the Train run goes with this process) and then waits, so that Ctrl+C reaches
    it as KeyboardInterrupt: in the main thread Ray Train installs a SIGINT handler of its own that kills
    the Train controller, and fit() then raises ActorDiedError, which reads like a crash. From another
    thread (a Tune trial) fit() runs in that thread and `while_fitting` in a helper."""
    if threading.current_thread() is not threading.main_thread():
        checker, checked = start_thread("muse-while-fitting", while_fitting)
        result = trainer.fit()
        checker.join()
        if "error" in checked:
            raise checked["error"]
        return result
    fitter, fitted = start_thread("ray-train-fit", trainer.fit)
    while_fitting()
    while fitter.is_alive():
        fitter.join(timeout=0.5)  # a join with a timeout lets KeyboardInterrupt through
    if "error" in fitted:
        raise fitted["error"]
    return fitted["result"]


def summarize_interrupted(cfg: RunConfig, wall_s: float, info: DatasetInfo) -> dict[str, Any] | None:
    """The summary and student of the run's last committed checkpoint, marked `interrupted`; None if the
    run committed none."""
    try:
        last = latest_checkpoint(cfg.output_dir)
    except ConfigError:
        return None
    return summarize(cfg, ray.train.Checkpoint.from_directory(str(last)), wall_s, info, interrupted=True)


def summarize(cfg: RunConfig, checkpoint: ray.train.Checkpoint, wall_s: float, info: DatasetInfo,
              interrupted: bool = False, start_marks: tuple[float, float] | None = None) -> dict[str, Any]:
    """The run's summary, read from the final checkpoint (synthesis counts summed over every rank) and
    written with the student to output_dir; `interrupted` marks it as the state where Ctrl+C left the run.
    With `start_marks` (time.time() when run() was called, and when the generator actors were up) it
    reports start-up: seconds from run() called to the first synthesis episode begun on an actor
    (`startup_s`), to the actors up, to the Train workers in their loop function, and to the first
    synthetic batch back in a Train worker."""
    with checkpoint.as_directory() as directory:
        saved, ranks = read_saved_run(Path(directory)), list(read_ranks(Path(directory)).values())
    summary = build_summary(cfg, teacher_acc=saved.teacher_acc, history=saved.history,
                            tally=SynthesisTally.total(rank["tally"] for rank in ranks), wall_s=wall_s,
                            loop_s=max(rank["loop_s"] for rank in ranks), kd_steps=saved.kd_steps,
                            episodes=sum(rank["episodes"] for rank in ranks), epochs_done=saved.epoch)
    summary |= {"checkpoint": checkpoint.path, "feed": [rank["source"]["feed"] for rank in ranks],
                "staleness": [rank["source"].get("staleness", {}) for rank in ranks],  # since the last (re)start
                "ray": cfg.ray.model_dump(mode="json")}
    first_batches = [rank["source"].get("first_record_at") for rank in ranks]
    first_episodes = [rank["source"].get("first_episode_at") for rank in ranks]
    worker_starts = [rank["source"].get("worker_started_at") for rank in ranks]
    if start_marks is not None and all(first_batches) and all(first_episodes) and all(worker_starts):
        started_at, actors_ready_at = start_marks
        # Synthesis starts before the epoch loop in a fresh run (its first episodes need no Train worker).
        leads = [rank["source"]["loop_started_at"] - rank["source"]["first_episode_at"] for rank in ranks
                 if rank["source"].get("loop_started_at")]
        summary["timing"] = {"startup_s": min(first_episodes) - started_at,
                             "actors_ready_s": actors_ready_at - started_at,
                             "workers_started_s": max(worker_starts) - started_at,
                             "first_batch_s": min(first_batches) - started_at,
                             "synthesis_before_loop_s": max([0.0, *leads])}
        loop_starts = [rank["source"].get("loop_started_at") for rank in ranks]
        if all(loop_starts):
            summary["timing"]["loop_started_s"] = max(loop_starts) - started_at
    if interrupted:
        summary["interrupted"] = {"after_epoch": saved.epoch, "resume_from": Path(checkpoint.path).name}
    save_outputs(cfg, summary, saved.student_state, info)
    return summary


