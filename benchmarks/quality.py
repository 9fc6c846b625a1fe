"""Student quality per method on one tier, same teacher, student and budget for every method.

    python benchmarks/quality.py --tier digits --methods muse,nayer,noise,real --seeds 0,1 --json out.json
    python benchmarks/quality.py --tier digits --methods muse,ablations --seeds 0,1,2 --threads 2
    python benchmarks/quality.py --tier mnist --methods muse --seeds 0,1

muse / nayer: the engine with its presets. Ablations: MUSE with one addition off (`muse-no-kr`,
`muse-no-ed`, `muse-no-aed`, `muse-at-R` for each resolution R of the set; `ablations` names them all).
noise: the same student, KD steps and image budget, but the pool holds Gaussian noise instead of
synthesised images (the floor). real: the student trained with labels on the real training split (a
reference, not data-free). Prints a table (final accuracy first: best-over-epochs selects on the test
split), writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import timm
import torch

from muse.config import ablation, ablation_names, load_config
from muse.data import load_dataset
from muse.engine import run_distillation
from muse.runtime import resolve_device
from muse.io import save_json
from muse.teacher import ensure_teacher, train_supervised

REPO = Path(__file__).resolve().parents[1]
TIERS = {"digits": [], "mnist": [f"data.root={REPO.parent / 'shared' / 'data' / 'mnist'}"]}  # shipped config: overrides
MIN_TEACHER_ACC = {"digits": 99.0, "mnist": 98.8}  # LeNet-5 on MNIST: DAFL's teacher is 98.9
METHOD_OVERRIDES = {
    "muse": ["method=muse"],
    "nayer": ["method=nayer"],
    "noise": ["method=nayer", "synthesis.source=noise"],
}


def run_method(tier: str, method: str, seed: int, out: Path, extra: list[str], threads: int) -> dict:
    overrides = [*TIERS[tier], *METHOD_OVERRIDES.get(method, ["method=muse"]), f"seed={seed}",
                 f"output_dir={out / f'{method}-s{seed}'}", f"teacher.checkpoint={out / 'teacher.pt'}", *extra]
    cfg = load_config(tier, overrides)
    if method not in METHOD_OVERRIDES and method != "real":
        cfg = ablation(cfg, method)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # this benchmark's own folder from an earlier invocation
    splits = load_dataset(cfg.data)
    row = {"method": method, "seed": seed, "threads": threads}
    if method == "real":
        started = time.perf_counter()
        torch.manual_seed(seed)
        student = timm.create_model(cfg.student.arch, num_classes=splits.info.num_classes,
                                    in_chans=splits.info.in_chans)
        acc = train_supervised(student, splits, cfg.teacher.epochs, cfg.teacher.batch_size, cfg.teacher.lr,
                               cfg.teacher.weight_decay, seed, resolve_device(cfg.device), desc=f"real s{seed}",
                               compute=cfg.teacher)
        return row | {"student_acc": acc, "best_acc": acc, "wall_s": time.perf_counter() - started,
                      "images": len(splits.train), "pixels": None}
    summary = run_distillation(cfg, splits)
    return row | {"student_acc": summary["student_acc"], "best_acc": summary["best_acc"], "wall_s": summary["wall_s"],
                  "images": summary["synthesis"]["images"], "pixels": summary["synthesis"]["total_pixels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=sorted(TIERS), default="digits")
    parser.add_argument("--methods", default="muse,nayer,noise,real")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budget", default=None, metavar="KIND=AMOUNT",
                        help="the same synthesis budget for every method: pixels=N, images=N, seconds=S or "
                             "episodes=E (E episodes of synthesis.batch_size images); default: the config's epochs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads per run (they change the numerics: report both 1 and 2)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="run folders")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.budget:
        args.overrides = [*args.overrides, *budget_overrides(args.budget, args.tier, parser)]
    cfg = load_config(args.tier, [*TIERS[args.tier], f"teacher.checkpoint={args.out / args.tier / 'teacher.pt'}",
                                  *args.overrides])
    known = [*METHOD_OVERRIDES, "real", *ablation_names(cfg)]
    methods = [name for m in args.methods.split(",") if m.strip()
               for name in (ablation_names(cfg) if m.strip() == "ablations" else [m.strip()])]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(known)} (or 'ablations')")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out / args.tier

    _, meta = ensure_teacher(cfg, load_dataset(cfg.data), resolve_device(cfg.device))
    if meta["test_acc"] < MIN_TEACHER_ACC[args.tier]:
        print(f"warning: the teacher scores {meta['test_acc']:.2f}%, under the {MIN_TEACHER_ACC[args.tier]}% this "
              f"tier assumes; retrain it (remove {cfg.teacher_checkpoint}) with more teacher.epochs")
    report = {"tier": args.tier, "teacher_acc": meta["test_acc"], "budget": args.budget or "epochs",
              "threads": args.threads, "results": []}
    for method in methods:
        for seed in seeds:
            report["results"].append(run_method(args.tier, method, seed, out, args.overrides, args.threads))
            if args.json:  # after every run: a long benchmark stopped midway keeps what it measured
                save_json(report, args.json)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")


def budget_overrides(text: str, tier: str, parser: argparse.ArgumentParser) -> list[str]:
    kind, _, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        parser.error(f"--budget {text!r}: the amount must be a number, e.g. pixels=2e6")
    if kind == "episodes":
        kind, value = "images", value * load_config(tier, TIERS[tier]).synthesis.batch_size
    if kind not in ("pixels", "images", "seconds") or value <= 0:
        parser.error(f"--budget {text!r}: use pixels=N, images=N, seconds=S or episodes=E with a positive amount")
    return ["budget.kind=" + kind, f"budget.amount={value}"]


def format_table(report: dict) -> str:
    lines = [f"tier {report['tier']}: teacher top-1 {report['teacher_acc']:.2f}%, budget {report.get('budget', 'epochs')}, "
             f"{report.get('threads', '?')} torch thread(s)",
             f"{'method':<12} {'seeds':>5} {'final %':>14} {'best %':>14} {'best-final':>10} {'wall s':>8} "
             f"{'images':>8} {'pixels':>10}"]
    by_method: dict[str, list[dict]] = {}
    for row in report["results"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        def mean_sd(values: list[float]) -> str:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {sd:.2f}"
        images = [sum(r["images"].values()) if isinstance(r["images"], dict) else r["images"] for r in rows]
        pixels = [r["pixels"] for r in rows if r["pixels"] is not None]
        lines.append(f"{method:<12} {len(rows):>5} {mean_sd([r['student_acc'] for r in rows]):>14} "
                     f"{mean_sd([r['best_acc'] for r in rows]):>14} "
                     f"{max(r['best_acc'] - r['student_acc'] for r in rows):>10.2f} "
                     f"{statistics.mean(r['wall_s'] for r in rows):>8.1f} {statistics.mean(images):>8.0f} "
                     f"{(f'{statistics.mean(pixels):.3g}' if pixels else '-'):>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
