"""`muse` command line: train a teacher, distill a student, show a resolved config.

    muse train-teacher --config digits
    muse distill --config digits loss.kr=1.0 resolution.set=[8,16]
    muse show-config --config mnist method=nayer
"""

from __future__ import annotations

import argparse
import sys

import yaml

from muse.config import ConfigError, load_config, shipped_configs
from muse.data import DatasetError, load_dataset
from muse.engine import resolve_device, run_distillation
from muse.teacher import train_teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("train-teacher", "train and save the teacher named by the config"),
                            ("distill", "run data-free distillation in this process"),
                            ("show-config", "print the fully resolved config as YAML")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default="digits",
                             help=f"YAML file or shipped config {shipped_configs()} (default: digits)")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.kr=2.0 seed=1")
        if name == "distill":
            add_tracking_flags(command)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [*tracking_overrides(args), *args.overrides])
        if args.command == "show-config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        elif args.command == "train-teacher":
            _, meta = train_teacher(cfg, load_dataset(cfg.data), resolve_device(cfg.device))
            print(f"teacher {meta['arch']} on {meta['dataset']}: test top-1 {meta['test_acc']:.2f}% "
                  f"→ {cfg.teacher_checkpoint}")
        else:
            summary = run_distillation(cfg)
            print(format_summary(summary))
            print(f"summary: {cfg.output_dir / 'summary.json'}")
            if cfg.tracking.enabled and cfg.tracking.uri is None:
                store = (cfg.output_dir / "mlflow.db").resolve()
                print(f"mlflow: mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1")
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


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


def format_summary(summary: dict) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
