"""`muse` command line: train a teacher, distill a student, show a resolved config.

    muse train-teacher --config digits
    muse distill --config digits loss.kr=1.0 resolution.set=[8,16]
    muse distill --config digits --stop-after-epoch 9        # checkpoint and stop (a staged run)
    muse distill --resume runs/digits                         # continue from the latest checkpoint
    muse show-config --config mnist method=nayer
    muse evaluate --checkpoint runs/digits/student.pt             # top-1 (top-5) on the run's test split
    muse evaluate --checkpoint teacher.pt --config my.yaml data.name=imagefolder data.root=/data/val_set
    muse export --run runs/digits --format timm                   # or safetensors, torchscript
    muse pool show runs/digits                                    # images per resolution and class
    muse pool export runs/digits --format imagefolder --out synthetic/   # or parquet (Hugging Face layout)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from muse.commandline import (add_run_control_flags, add_tracking_flags, format_summary, interrupted_message,
                              parse_command_line, run_config, tracking_overrides)
from muse.config import ConfigError, error_summary, load_config, shipped_configs, typed_overrides
from muse.data import DatasetError, load_dataset
from muse.engine import run_distillation
from muse.evaluate import topk_accuracy
from muse.export import FORMATS, export_student, load_snippet
from muse.errors import RunInterrupted
from muse.pool_files import EXPORT_FORMATS, export_pool, format_pool_summary, summarize_pool
from muse.runtime import resolve_device
from muse.saved_models import load_classifier
from muse.teacher import train_teacher
from muse.tracking import ui_hint


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
    evaluate = commands.add_parser("evaluate", help="top-1 (and top-5) of a saved student or teacher on a dataset")
    evaluate.add_argument("--checkpoint", type=Path, required=True,
                          help="a run's student.pt, a teacher checkpoint, or a plain/exported state dict")
    evaluate.add_argument("--config", default=None,
                          help="the dataset to evaluate on, as a config (default: the run's config.yaml beside "
                               "the checkpoint, else digits)")
    evaluate.add_argument("--arch", default=None, help="timm model name, for a plain state dict that does not record it")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=... data.resolution=32")
    export = commands.add_parser("export", help="write a run's student as a timm, safetensors or TorchScript file")
    export.add_argument("--run", type=Path, required=True, help="a finished run's output_dir")
    export.add_argument("--format", choices=FORMATS, default="timm")
    export.add_argument("--out", type=Path, default=None, help="where to write (default: <run>/export/)")
    pool = commands.add_parser("pool", help="look at a run's synthetic pool, or export it").add_subparsers(
        dest="pool_command", required=True)
    pool.add_parser("show", help="images per resolution and class").add_argument(
        "path", type=Path, help="a run's output_dir or its pool folder")
    pool_export = pool.add_parser("export", help="as an ImageFolder of PNGs or a Hugging Face Parquet dataset")
    pool_export.add_argument("path", type=Path, help="a run's output_dir or its pool folder")
    pool_export.add_argument("--format", choices=EXPORT_FORMATS, default="imagefolder")
    pool_export.add_argument("--out", type=Path, required=True, help="a new folder to write")
    args = parse_command_line(parser, argv)
    cfg = None
    try:
        if args.command == "evaluate":
            return evaluate_checkpoint(args.checkpoint, args.config, args.arch, args.overrides)
        if args.command == "export":
            path, saved = export_student(args.run, args.format, args.out)
            print(f"exported the student ({args.format}) → {path}\nload it with:\n"
                  + load_snippet(args.format, path, saved))
            return 0
        if args.command == "pool":
            if args.pool_command == "show":
                print(format_pool_summary(summarize_pool(args.path)))
            else:
                counts = export_pool(args.path, args.format, args.out)
                print(f"exported {sum(counts.values()):,} images ({args.format}) → {args.out}")
            return 0
        if args.command == "distill":
            cfg, checkpoint = run_config(args, tracking_overrides(args))
        else:
            cfg, checkpoint = load_config(args.config, typed_overrides(args.overrides)), None
        if args.command == "show-config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        elif args.command == "train-teacher":
            _, meta = train_teacher(cfg, load_dataset(cfg.data), resolve_device(cfg.device))
            print(f"teacher {meta['arch']} on {meta['dataset']}: test top-1 {meta['test_acc']:.2f}% "
                  f"→ {cfg.teacher_checkpoint}")
        else:
            try:
                summary = run_distillation(cfg, resume_from=checkpoint, stop_after_epoch=args.stop_after_epoch,
                                           overwrite=args.overwrite)
            except RunInterrupted as stop:
                print(interrupted_message(cfg, stop.summary, "muse distill"), file=sys.stderr)
                return 130
            print(format_summary(summary))
            print(f"summary: {cfg.output_dir / 'summary.json'}")
            if hint := ui_hint(cfg):
                print(hint)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # mid-run: disk full, the folder removed or made read-only
        if args.command != "distill" or cfg is None:  # not a run's writing: a plain error, with its traceback
            raise
        print(f"error: the run stopped: {error_summary(error)}; its last committed checkpoint is intact: free space "
              f"or fix the folder, then continue with: muse distill --resume {cfg.output_dir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before or after the epochs (inside them the run saves what it has)
        print(f"interrupted: muse {args.command} stopped before it finished", file=sys.stderr)
        return 130
    return 0


def evaluate_checkpoint(checkpoint: Path, config: str | None, arch: str | None, overrides: list[str]) -> int:
    """Print the top-1 (and top-5 for 10 classes or more) of a saved classifier on a dataset's test split."""
    beside = checkpoint.parent / "config.yaml"
    cfg = load_config(config or (str(beside) if beside.is_file() else "digits"), typed_overrides(overrides))
    splits = load_dataset(cfg.data)
    saved = load_classifier(checkpoint, arch=arch, info=splits.info)
    info = splits.info
    ks = (1, 5) if info.num_classes >= 10 else (1,)
    device = resolve_device(cfg.device)
    scores = topk_accuracy(saved.model.to(device), splits.test, ks, cfg.data.eval_batch_size, device, progress=True)
    print(f"{saved.kind} {saved.arch} on {info.name} test ({len(splits.test)} images, {info.resolution} px): "
          + ", ".join(f"top-{k} {scores[k]:.2f}%" for k in ks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
