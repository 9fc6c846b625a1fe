"""What every command line shares (`muse distill`, `python orchestration/run.py`, `python sweeps/run.py`):
the tracking flags, the run-control flags (`--resume`, `--stop-after-epoch`), the config a resumed
run continues with, and the summary printed at the end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from muse.config import (ConfigError, RunConfig, load_config, parse_overrides, typed_overrides, validate_config,
                         with_overrides)


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that overrides (`key=value`) may also follow flags, as in
    `seed=1 --no-tracking loss.kr=0`: argparse takes one run of positionals and would blame `loss.kr=0`."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-uri", metavar="URI",
                        help="MLflow tracking server, e.g. http://127.0.0.1:5000 (default: an sqlite store in output_dir)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-optional", action="store_true",
                        help="if the MLflow server is unreachable, warn and go on without tracking")


def tracking_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the tracking flags stand for (absent flags add nothing)."""
    overrides = [f"tracking.uri={args.mlflow_uri}"] if getattr(args, "mlflow_uri", None) else []
    if getattr(args, "no_tracking", False):
        overrides.append("tracking.enabled=false")
    if getattr(args, "tracking_optional", False):
        overrides.append("tracking.required=false")
    return overrides


def add_run_control_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue the run in DIR (its output_dir) from its latest committed checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds an earlier run: its outputs, checkpoints "
                             "and pool are deleted first (its MLflow runs stay in the store)")
    parser.add_argument("--stop-after-epoch", type=_positive_int, metavar="N",
                        help="checkpoint and stop once N epochs (warm-up included; epochs count from 1) are "
                             "done: a staged run")


def run_config(args: argparse.Namespace, flags: list[str]) -> tuple[RunConfig, Path | None]:
    """The config to run and, with `--resume DIR`, the checkpoint to continue from. A resumed run keeps
    its saved config: flags (tracking, placement) still apply, overrides are refused."""
    if args.resume is not None and getattr(args, "overwrite", False):
        raise ConfigError("--resume continues a run and --overwrite deletes it: give one of them")
    if args.resume is None:
        return load_config(args.config, [*flags, *typed_overrides(args.overrides)]), None
    from muse.checkpoint import latest_checkpoint, read_saved_run  # torch and the models: only to resume

    checkpoint = latest_checkpoint(args.resume)
    if args.overrides:
        raise ConfigError("--resume continues a run with its saved config; drop the overrides "
                          f"({' '.join(args.overrides)}) or start a new run")
    cfg = validate_config(read_saved_run(checkpoint).config)
    if flags:
        cfg = with_overrides(cfg, parse_overrides(flags))
    return cfg, checkpoint


def format_summary(summary: dict[str, Any]) -> str:
    images = summary["synthesis"]["images"]
    rows = [
        ("method", summary["method"]),
        ("teacher", f"{summary['teacher']}  top-1 {summary['teacher_acc']:.2f}%"),
        ("student", f"{summary['student']}  top-1 {summary['student_acc']:.2f}% (final), "
                    f"{summary['best_acc']:.2f}% (best, epoch {summary['best_epoch']})"
                    if summary["student_acc"] is not None else f"{summary['student']}  not evaluated yet (warm-up)"),
        ("synthesised", ", ".join(f"{n} images @{r}px" for r, n in images.items())),
        ("wall time", f"{summary['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def interrupted_message(cfg: RunConfig, summary: dict[str, Any] | None, command: str) -> str:
    """One line for a run stopped by Ctrl+C: what was kept, and how to continue (`command` --resume)."""
    where = cfg.output_dir
    if summary is None:
        return "interrupted before the first checkpoint was committed: nothing to keep; start again with --overwrite"
    stop = summary["interrupted"]
    acc = f", {summary['student_acc']:.2f}% at its last evaluation" if summary["student_acc"] is not None else ""
    resume = (f"continue from {stop['resume_from']} with: {command} --resume {where}" if stop["resume_from"]
              else "no checkpoint was committed yet: start again with --overwrite")
    return f"interrupted after epoch {stop['after_epoch']}: the student so far{acc} is in {where / 'student.pt'}; {resume}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an epoch count: give N ≥ 1 (epochs count from 1)")
    return value
