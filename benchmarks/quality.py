"""Student quality per method on one tier, same teacher, student and budget for every method.

    python benchmarks/quality.py --tier digits --methods muse,nayer,noise,real --seeds 0,1 --json out.json

muse / nayer: the engine with its presets. noise: the same student, KD steps and image budget, but the
pool holds Gaussian noise instead of synthesised images (the floor). real: the student trained with
labels on the real training split (a reference, not data-free). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import timm

from muse.config import load_config
from muse.data import load_dataset
from muse.engine import run_distillation
from muse.runtime import resolve_device
from muse.io import save_json
from muse.teacher import ensure_teacher, train_supervised

TIERS = {"digits": "digits", "mnist": "mnist"}
METHOD_OVERRIDES = {
    "muse": ["method=muse"],
    "nayer": ["method=nayer"],
    "noise": ["method=nayer", "synthesis.source=noise"],
}


def run_method(tier: str, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    overrides = [*METHOD_OVERRIDES.get(method, []), f"seed={seed}", f"output_dir={out / f'{method}-s{seed}'}",
                 f"teacher.checkpoint={out / 'teacher.pt'}", *extra]
    cfg = load_config(TIERS[tier], overrides)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # this benchmark's own folder from an earlier invocation
    splits = load_dataset(cfg.data)
    if method == "real":
        started = time.perf_counter()
        student = timm.create_model(cfg.student.arch, num_classes=splits.info.num_classes,
                                    in_chans=splits.info.in_chans)
        acc = train_supervised(student, splits, cfg.teacher.epochs, cfg.teacher.batch_size, cfg.teacher.lr,
                               cfg.teacher.weight_decay, seed, resolve_device(cfg.device), desc=f"real s{seed}")
        return {"method": method, "seed": seed, "student_acc": acc, "best_acc": acc,
                "wall_s": time.perf_counter() - started, "images": len(splits.train), "pixels": None}
    summary = run_distillation(cfg, splits)
    return {"method": method, "seed": seed, "student_acc": summary["student_acc"], "best_acc": summary["best_acc"],
            "wall_s": summary["wall_s"], "images": summary["synthesis"]["images"],
            "pixels": summary["synthesis"]["total_pixels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=sorted(TIERS), default="digits")
    parser.add_argument("--methods", default="muse,nayer,noise,real")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="run folders")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every method")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {*METHOD_OVERRIDES, "real"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from muse, nayer, noise, real")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out / args.tier

    cfg = load_config(TIERS[args.tier], [f"teacher.checkpoint={out / 'teacher.pt'}", *args.overrides])
    _, meta = ensure_teacher(cfg, load_dataset(cfg.data), resolve_device(cfg.device))
    results = [run_method(args.tier, m, s, out, args.overrides) for m in methods for s in seeds]
    report = {"tier": args.tier, "teacher_acc": meta["test_acc"], "results": results}
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


def format_table(report: dict) -> str:
    lines = [f"tier {report['tier']}: teacher top-1 {report['teacher_acc']:.2f}%",
             f"{'method':<8} {'seeds':>5} {'final %':>16} {'best %':>16} {'wall s':>8} {'images':>8}"]
    by_method: dict[str, list[dict]] = {}
    for row in report["results"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        def mean_sd(key: str) -> str:
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {sd:.2f}"
        images = rows[0]["images"]
        total = sum(images.values()) if isinstance(images, dict) else images
        lines.append(f"{method:<8} {len(rows):>5} {mean_sd('student_acc'):>16} {mean_sd('best_acc'):>16} "
                     f"{statistics.mean(r['wall_s'] for r in rows):>8.1f} {total:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
