"""The Ray runner behind `python orchestration/run.py`: connect to (or start) a cluster, start the
generator actors and the weight store, fit a Ray Train `TorchTrainer` running `train_loop_per_worker`,
and summarise the run from its final checkpoint. Importing it changes nothing (no environment, no
sys.path): `orchestration/run.py` is the script that bootstraps and calls `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
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
from muse.commandline import (add_run_control_flags, add_tracking_flags, format_summary, interrupted_message,
                              parse_command_line, run_config, tracking_overrides)
from muse.config import ConfigError, RunConfig
from muse.data import DatasetError, DatasetInfo, load_dataset
from muse.loop import SynthesisTally, episodes_of_epoch
from muse.outputs import RunInterrupted, build_summary, save_outputs
from muse.runtime import resolve_device
from muse.synthesis import applicable_key_region
from muse.teacher import ensure_teacher
from muse.tracking import Tracker, check_store, finish_tracking, run_tracker, ui_hint
from orchestration.cluster import connect
from orchestration.commit_pointer import CommitPointer
from orchestration.feed import submit_first_episodes
from orchestration.generator_actor import create_generator_actors, wait_until_ready
from orchestration.train_loop import train_loop_per_worker
from orchestration.weight_store import create_weight_store, wait_until_store_ready

USAGE = """Run MUSE on Ray: generator actors feed the object store, Ray Train workers distil the student.

    python orchestration/run.py                                  # embedded default (digits), local Ray
    python orchestration/run.py --config mnist data.root=../shared/data/mnist --generators 2
    ray job submit --working-dir . -- python orchestration/run.py --config digits
    python orchestration/run.py --stop-after-epoch 9             # checkpoint and stop (a staged run)
    python orchestration/run.py --resume runs/digits              # continue from the latest checkpoint

With RAY_ADDRESS set (as inside `ray job submit`) or `ray.address=...` it joins that cluster;
otherwise it starts a local one bound to 127.0.0.1 and stops it at the end.
"""

FLAG_OVERRIDES = {  # command-line flag → config field
    "generators": "ray.generators.count", "generator_cpus": "ray.generators.num_cpus",
    "generator_gpus": "ray.generators.num_gpus", "workers": "ray.train.count",
    "worker_cpus": "ray.train.cpus_per_worker", "in_flight": "ray.feed.in_flight",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits", help="YAML file or shipped config name (default: digits)")
    parser.add_argument("--generators", type=int, help="GeneratorActors (ray.generators.count)")
    parser.add_argument("--generator-cpus", type=float, help="CPUs per generator actor (fractions allowed)")
    parser.add_argument("--generator-gpus", type=float, help="GPUs per generator actor, e.g. 0.25")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP); 0 runs the loop in the driver")
    parser.add_argument("--worker-cpus", type=float, help="CPUs per Train worker")
    parser.add_argument("--in-flight", type=int, help="generate() calls each worker keeps in flight")
    parser.add_argument("--gpu", action="store_true", help="Train workers and generators on GPUs")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    add_run_control_flags(parser)
    add_tracking_flags(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. loss.kr=2.0")
    return parse_command_line(parser, argv)


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, ray.train.Checkpoint | None]:
    flags = [f"{field}={getattr(args, name)}" for name, field in FLAG_OVERRIDES.items()
             if getattr(args, name) is not None] + tracking_overrides(args)
    if args.gpu:
        flags += ["ray.train.use_gpu=true", "device=cuda"]
        if args.generator_gpus is None:
            flags.append("ray.generators.num_gpus=0.25")
    cfg, checkpoint = run_config(args, flags)
    return cfg, ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None


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
    first_calls = submit_first_episodes(actors, cfg.ray.train.count or 1,
                                        first_episodes_per_rank(cfg) if checkpoint is None else 0)
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


def first_episodes_per_rank(cfg: RunConfig) -> int:
    """How many of each Train rank's first warm-up episodes the driver submits: the first warm-up epoch's,
    up to two per generator actor (enough to keep the actors busy until the Train workers are up,
    without holding many batches in the object store)."""
    if cfg.synthesis.warmup == 0:
        return 0
    world = cfg.ray.train.count or 1
    per_rank_actors = math.ceil(cfg.ray.generators.count / world)
    first_epoch = episodes_of_epoch(cfg, 0, world)
    assert first_epoch is not None  # a warm-up epoch's count never depends on a budget
    return min(first_epoch, max(cfg.ray.feed.in_flight, 2 * per_rank_actors))


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


def start_thread(name: str, work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """A daemon thread running `work`; the dict gets its `result`, or the `error` it raised (for the
    caller's thread to re-raise)."""
    outcome: dict[str, Any] = {}

    def run_work() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run_work, name=name, daemon=True)
    thread.start()
    return thread, outcome


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_cluster = False
    cfg: RunConfig | None = None
    try:
        cfg, checkpoint = resolve_config(args)
        started_cluster = connect(cfg, args.num_cpus)
        summary = run(cfg, checkpoint, args.stop_after_epoch, overwrite=args.overwrite)
    except RunInterrupted as stop:
        print(interrupted_message(cfg, stop.summary, "python orchestration/run.py"), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the run started, or while it was being summarised
        print("interrupted: orchestration/run.py stopped before the run started", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a failed run says why and exits non-zero
        reason = " ".join(str(error).split())  # Ray Train's errors span lines
        print(f"error: the run failed: {type(error).__name__}: {reason}{resume_hint(cfg)}", file=sys.stderr)
        return 1
    finally:
        if started_cluster:
            ray.shutdown()
    print(format_summary(summary))
    print(f"summary: {cfg.output_dir.resolve() / 'summary.json'}")
    if hint := ui_hint(cfg):
        print(hint)
    return 0


def resume_hint(cfg: RunConfig | None) -> str:
    """For a run that failed midway (a full disk, a lost node): where it can continue from, if anywhere."""
    if cfg is None:
        return ""
    try:
        last = latest_checkpoint(cfg.output_dir)
    except ConfigError:
        return ""
    return (f"; its last committed checkpoint ({last.name}) is intact: fix the cause (e.g. free space), then "
            f"continue with: python orchestration/run.py --resume {cfg.output_dir}")
