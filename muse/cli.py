"""`muse` command line: train a teacher, distill a student, show a resolved config.

    muse train-teacher --config digits
    muse distill --config digits loss.kr=1.0 resolution.set=[8,16]
    muse distill --config digits --stop-after-epoch 9        # checkpoint and stop (a staged run)
    muse distill --resume runs/digits                         # continue from the latest checkpoint
    muse show-config --config mnist method=nayer
"""

from __future__ import annotations

import argparse
import sys

import yaml

from muse.commandline import (add_run_control_flags, add_tracking_flags, format_summary, run_config,
                              tracking_overrides)
from muse.config import ConfigError, load_config, shipped_configs
from muse.data import DatasetError, load_dataset
from muse.engine import run_distillation
from muse.runtime import resolve_device
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
            add_run_control_flags(command)
            add_tracking_flags(command)
    args = parser.parse_args(argv)
    try:
        if args.command == "distill":
            cfg, checkpoint = run_config(args, tracking_overrides(args))
        else:
            cfg, checkpoint = load_config(args.config, args.overrides), None
        if args.command == "show-config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        elif args.command == "train-teacher":
            _, meta = train_teacher(cfg, load_dataset(cfg.data), resolve_device(cfg.device))
            print(f"teacher {meta['arch']} on {meta['dataset']}: test top-1 {meta['test_acc']:.2f}% "
                  f"→ {cfg.teacher_checkpoint}")
        else:
            summary = run_distillation(cfg, resume_from=checkpoint, stop_after_epoch=args.stop_after_epoch)
            print(format_summary(summary))
            print(f"summary: {cfg.output_dir / 'summary.json'}")
            if cfg.tracking.enabled and cfg.tracking.uri is None:
                store = (cfg.output_dir / "mlflow.db").resolve()
                print(f"mlflow: mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1")
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
