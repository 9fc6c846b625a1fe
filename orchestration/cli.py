"""The command line of `python orchestration/run.py` (and of `ray job submit -- python
orchestration/run.py`): parse and check the arguments, join or start the cluster, hand the run to
`orchestration.runner`, and print what came of it.

This module imports no torch and no models: a bad argument or config is refused in about a second, and
on a local cluster the heavy imports (`orchestration.runner`: torch, timm, Ray Train; about 6 s of one
core here) run in a helper thread while `ray.init` waits for the cluster's processes, instead of before.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import ray

from muse.commandline import (add_run_control_flags, add_tracking_flags, format_summary, interrupted_message,
                              parse_command_line, run_config, tracking_overrides)
from muse.config import ConfigError, RunConfig
from muse.datasets import DatasetError
from muse.errors import RunInterrupted
from muse.tracking import ui_hint
from orchestration.cluster import connect
from orchestration.threads import start_thread

if TYPE_CHECKING:
    import ray.train

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
    if checkpoint is None:
        return cfg, None
    import ray.train

    return cfg, ray.train.Checkpoint.from_directory(str(checkpoint))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_cluster = False
    cfg: RunConfig | None = None
    try:
        cfg, checkpoint = resolve_config(args)
        with importing_beside("orchestration.runner"):  # torch, timm, Ray Train: while the cluster starts
            started_cluster = connect(cfg, args.num_cpus)
        from orchestration.runner import run

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
    from muse.checkpoint import latest_checkpoint

    try:
        last = latest_checkpoint(cfg.output_dir)
    except ConfigError:
        return ""
    return (f"; its last committed checkpoint ({last.name}) is intact: fix the cause (e.g. free space), then "
            f"continue with: python orchestration/run.py --resume {cfg.output_dir}")


@contextmanager
def importing_beside(module: str) -> Iterator[None]:
    """Import `module` in a helper thread while the block runs. The block's thread mostly waits (for the
    cluster's processes), so the import takes the core it leaves. An error in that import is left for
    the caller's own import of the module to raise; a block that raises does not wait for the import."""
    thread, _ = start_thread(f"import {module}", lambda: importlib.import_module(module))
    yield
    thread.join()
