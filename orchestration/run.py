"""Run MUSE on Ray: generator actors feed the object store, Ray Train workers distil the student.

    python orchestration/run.py                                  # embedded default (digits), local Ray
    python orchestration/run.py --config mnist data.root=../shared/data/mnist --generators 2
    ray job submit --working-dir . -- python orchestration/run.py --config digits
    python orchestration/run.py --resume runs/digits-ray          # continue from the latest checkpoint

With RAY_ADDRESS set (as inside `ray job submit`) or `ray.address=...` it joins that cluster;
otherwise it starts a local one bound to 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python orchestration/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Keep every Ray listener of a cluster we start on 127.0.0.1 (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import ray.train
import torch
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from muse.cli import add_tracking_flags, format_summary, tracking_overrides
from muse.config import ConfigError, RunConfig, load_config, parse_overrides, validate_config, with_overrides
from muse.data import DatasetError, load_dataset
from muse.engine import (SynthesisTally, build_summary, finish_tracking, history_metrics, resolve_device,
                         save_outputs)
from muse.tracking import NullTracker, create_tracker
from muse.teacher import ensure_teacher
from orchestration.generator_actor import create_generator_actors, wait_until_ready
from orchestration.train_loop import STATE_FILE, read_state, train_loop_per_worker
from orchestration.weight_store import create_weight_store

# Ray Train V2 drops `resume_from_checkpoint` (it raises); it restores a run from this file in its folder.
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"

FLAG_OVERRIDES = {  # command-line flag → config field
    "generators": "ray.generators.count", "generator_cpus": "ray.generators.num_cpus",
    "generator_gpus": "ray.generators.num_gpus", "workers": "ray.train.count",
    "worker_cpus": "ray.train.cpus_per_worker", "in_flight": "ray.feed.in_flight",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits", help="YAML file or shipped config name (default: digits)")
    parser.add_argument("--generators", type=int, help="GeneratorActors (ray.generators.count)")
    parser.add_argument("--generator-cpus", type=float, help="CPUs per generator actor (fractions allowed)")
    parser.add_argument("--generator-gpus", type=float, help="GPUs per generator actor, e.g. 0.25")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP); 0 runs the loop in the driver")
    parser.add_argument("--worker-cpus", type=float, help="CPUs per Train worker")
    parser.add_argument("--in-flight", type=int, help="generate() calls each worker keeps in flight")
    parser.add_argument("--gpu", action="store_true", help="Train workers and generators on GPUs")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--resume", type=Path, help="run folder to continue from its latest checkpoint")
    parser.add_argument("--stop-after-epoch", type=int, help="checkpoint and stop after this epoch (staged runs)")
    add_tracking_flags(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. loss.kr=2.0")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, ray.train.Checkpoint | None]:
    flags = [f"{field}={getattr(args, name)}" for name, field in FLAG_OVERRIDES.items()
             if getattr(args, name) is not None] + tracking_overrides(args)
    if args.gpu:
        flags += ["ray.train.use_gpu=true", "device=cuda"]
        if args.generator_gpus is None:
            flags.append("ray.generators.num_gpus=0.25")
    if args.resume is None:
        return load_config(args.config, [*flags, *args.overrides]), None
    checkpoint = latest_checkpoint(args.resume)
    saved = read_state(checkpoint)["config"]
    if args.overrides:
        raise ConfigError("--resume continues a run with its saved config; drop the overrides "
                          f"({' '.join(args.overrides)}) or start a new run")
    cfg = validate_config(saved)
    if flags:
        cfg = with_overrides(cfg, parse_overrides(flags))
    return cfg, checkpoint


def latest_checkpoint(run_dir: Path) -> ray.train.Checkpoint:
    """The newest checkpoint Ray Train committed in a run's folder: the one its snapshot names, not the
    newest folder, which may be half-copied if the run stopped while writing it."""
    directory = Path(run_dir).resolve()
    try:
        snapshot = json.loads((directory / TRAIN_SNAPSHOT).read_text())
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if name is None or not (directory / name / STATE_FILE).is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no checkpoint_*/{STATE_FILE} there that Ray Train committed "
                          f"(read from {TRAIN_SNAPSHOT}); give the run's output_dir (the folder that holds "
                          "summary.json and the checkpoints)")
    return ray.train.Checkpoint.from_directory(str(directory / name))


def connect(cfg: RunConfig, num_cpus: int | None) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS, else start a local one. True if we started it."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        try:
            ray.init(address=address)
        except ConnectionError as error:
            raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({error}); start one with "
                              "`ray start --head`, fix ray.address / RAY_ADDRESS, or unset it to run locally") from None
        return False
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls; loopback only.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")
    return True


def run(cfg: RunConfig, checkpoint: ray.train.Checkpoint | None = None, stop_after_epoch: int | None = None,
        *, tracker: NullTracker | None = None, callbacks: Sequence[UserCallback] = ()) -> dict[str, Any]:
    """Train the teacher if needed, start the generators and the weight store, fit the TorchTrainer,
    and write the summary. Ray must be initialised.

    Without `tracker` the run opens its own MLflow run and closes it; a caller that passes one (a sweep
    trial, which may fit several segments into one run) logs the final files and closes it itself.
    `callbacks` are Ray Train callbacks (e.g. the Tune report callback of a sweep)."""
    started = time.perf_counter()
    cfg = cfg.model_copy(update={"output_dir": cfg.output_dir.resolve()})
    if checkpoint is None and (cfg.output_dir / TRAIN_SNAPSHOT).is_file():
        # Ray Train restores a run from its output_dir's snapshot by itself: a fresh run there would
        # silently continue the old one (with its weights and counters under the new config).
        raise ConfigError(f"output_dir {str(cfg.output_dir)!r} holds an earlier run's checkpoints; continue it "
                          "with --resume, or give a new output_dir")
    splits = load_dataset(cfg.data)
    ensure_teacher(cfg, splits, resolve_device("cpu" if cfg.device == "auto" else cfg.device))
    owns_tracker = tracker is None
    if tracker is None:
        tracker = create_tracker(cfg)  # an unreachable tracking server fails here, before any work
        if checkpoint is not None:  # a resumed run's MLflow run starts with the epochs before the resume
            for entry in read_state(checkpoint)["history"]:
                tracker.log_epoch(entry["epoch"], history_metrics(entry))
    store_name = f"muse-weights-{uuid.uuid4().hex[:8]}"
    store = create_weight_store(store_name)
    g = cfg.ray.generators
    actors = create_generator_actors(cfg, g.count, g.num_cpus, g.num_gpus, store_name, splits.info,
                                     resources=g.resources)
    try:
        wait_until_ready(actors)
        t = cfg.ray.train
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": cfg.model_dump(mode="json"), "generators": actors,
                               "weight_store": store_name, "stop_after_epoch": stop_after_epoch,
                               "resume_from": checkpoint, "tracking": tracker.handle},
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.count, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": t.cpus_per_worker, **t.resources}),
            run_config=ray.train.RunConfig(name=cfg.output_dir.name, storage_path=str(cfg.output_dir.parent),
                                           callbacks=list(callbacks),
                                           logging_config=ray.train.LoggingConfig(log_level=t.log_level)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"distillation failed: {result.error}") from result.error
    except BaseException:
        if owns_tracker:
            tracker.finish([], status="FAILED")  # whatever stopped the run, its MLflow run says so
        raise
    finally:
        for actor in [*actors, store]:
            ray.kill(actor)
    summary = summarize(cfg, result.checkpoint, time.perf_counter() - started)
    if owns_tracker:
        finish_tracking(tracker, cfg, summary, step=summary["epochs_done"])
    return summary


def summarize(cfg: RunConfig, checkpoint: ray.train.Checkpoint, wall_s: float) -> dict[str, Any]:
    """The run's summary, read from the final checkpoint and written with the student to output_dir."""
    with checkpoint.as_directory() as tmp:
        directory = Path(tmp)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        ranks = [json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))]
    tally = SynthesisTally.total(rank["tally"] for rank in ranks)
    summary = build_summary(cfg, state["teacher_acc"], state["history"], tally, wall_s,
                            state["distiller"]["steps"], sum(r["episodes"] for r in ranks))
    summary |= {"epochs_done": state["epoch"], "checkpoint": checkpoint.path,
                "loop_s": max(r["loop_s"] for r in ranks), "feed": [r["feed"] for r in ranks],
                "ray": cfg.ray.model_dump(mode="json")}
    save_outputs(cfg, summary, state["distiller"]["student"])
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_cluster = False
    try:
        cfg, checkpoint = resolve_config(args)
        started_cluster = connect(cfg, args.num_cpus)
        summary = run(cfg, checkpoint, args.stop_after_epoch)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a failed run says why and exits non-zero
        print(f"error: the run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if started_cluster:
            ray.shutdown()
    print(format_summary(summary))
    print(f"summary: {cfg.output_dir.resolve() / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
