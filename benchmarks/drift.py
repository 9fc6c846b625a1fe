"""Where the late drift of the final student comes from, measured: at every evaluation of a run, the
same student is also scored

- `pool_bn`: its BatchNorm statistics recomputed over the whole pool (`Distiller.recalibrate_bn`);
- `recent_bn`: recomputed over the pool's newest records only (about `--recent` images);
- `lagged_bn`: with the statistics it had `--lag` epochs earlier (weights of now);
- `ema_pool_bn`: an exponential moving average of its weights (decay `--ema`), statistics over the pool;

beside `trained` (what the run evaluates: the weights and running statistics as training leaves them).
If recomputed statistics hold the final accuracy where `trained` falls, the running statistics drift;
if every variant falls together, the weights do.

    python benchmarks/drift.py --seeds 0,1,2 --threads 1 --json benchmarks/results/drift_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse.config import load_config
from muse.data import load_dataset
from muse.distillation import Distiller
from muse.engine import build_run
from muse.evaluate import accuracy
from muse.loop import EpochHooks, LocalSynthesis, RunState, run_epochs
from muse.teacher import ensure_teacher

VARIANTS = ("trained", "pool_bn", "recent_bn", "lagged_bn", "ema_pool_bn")


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


class DriftProbe(EpochHooks):
    def __init__(self, distiller: Distiller, pool: Any, test: Any, recent_images: int, lag: int, ema: float) -> None:
        self.distiller, self.pool, self.test = distiller, pool, test
        self.recent_images, self.lag = recent_images, lag
        self.ema_model = torch.optim.swa_utils.AveragedModel(
            distiller.student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema))
        self.past_bn: deque[dict[str, torch.Tensor]] = deque(maxlen=lag + 1)
        self.rows: list[dict[str, float]] = []

    def after_kd_step(self, distiller: Distiller) -> None:
        self.ema_model.update_parameters(distiller.student)

    def after_epoch(self, epoch: int, metrics: dict[str, Any], state: RunState, last: bool) -> None:
        if "student_acc" not in metrics:
            return
        student = self.distiller.student.backbone
        self.past_bn.append(bn_buffers(student))
        row = {"epoch": epoch, "trained": metrics["student_acc"]}
        probe = copy.deepcopy(self.distiller.student)  # the run's own student stays as training left it
        records = self.pool.records
        self.distiller.recalibrate_bn(records, probe)
        row["pool_bn"] = accuracy(probe.backbone, self.test)
        newest, count = [], 0
        for record in reversed(records):
            if count >= self.recent_images:
                break
            newest.append(record)
            count += len(record)
        self.distiller.recalibrate_bn(newest, probe)
        row["recent_bn"] = accuracy(probe.backbone, self.test)
        lagged = copy.deepcopy(student)
        lagged.load_state_dict(self.past_bn[0], strict=False)
        row["lagged_bn"] = accuracy(lagged, self.test)
        probe.load_state_dict(self.ema_model.module.state_dict())
        self.distiller.recalibrate_bn(records, probe)
        row["ema_pool_bn"] = accuracy(probe.backbone, self.test)
        self.rows.append(row)
        print(" ".join(f"{k} {v:.2f}" if k != "epoch" else f"epoch {v}" for k, v in row.items()), flush=True)


def probe_run(seed: int, overrides: list[str], args: argparse.Namespace) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"seed={seed}", f"output_dir={out}/run", "tracking.enabled=false",
                                        f"teacher.checkpoint={args.teacher}", *overrides])
        splits = load_dataset(cfg.data)
        ensure_teacher(cfg, splits)
        parts = build_run(cfg, splits)
        probe = DriftProbe(parts.distiller, parts.pool, splits.test, args.recent, args.lag, args.ema)
        run_epochs(cfg, RunState.fresh(cfg.seed), LocalSynthesis(parts.synthesizer, parts.schedule, parts.distiller),
                   parts.distiller, parts.pool, lambda model: accuracy(model, splits.test), probe)
        return probe.rows


def summarize(rows: list[dict[str, float]], tail: int) -> dict[str, dict[str, float]]:
    """Per variant: final, best, best − final, and the mean over the last `tail` evaluations."""
    return {v: {"final": rows[-1][v], "best": max(r[v] for r in rows),
                "drop": max(r[v] for r in rows) - rows[-1][v],
                f"last{tail}_mean": statistics.mean(r[v] for r in rows[-tail:])} for v in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recent", type=int, default=1000, help="images in the recent_bn variant")
    parser.add_argument("--lag", type=int, default=5, help="epochs back for lagged_bn")
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay per KD step for ema_pool_bn")
    parser.add_argument("--tail", type=int, default=10)
    parser.add_argument("--teacher", type=Path, default=Path("runs/bench-drift/teacher.pt"),
                        help="one teacher for every seed (trained here with seed 0 if missing)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.teacher = args.teacher.resolve()
    torch.set_num_threads(args.threads)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows = probe_run(seed, args.overrides, args)
        results.append({"seed": seed, "threads": args.threads, "summary": summarize(rows, args.tail), "rows": rows})
    print(f"\n{'variant':<12} {'final':>14} {'best - final':>14} {f'last {args.tail} mean':>14}   (mean ± std over seeds)")
    for variant in VARIANTS:
        cells = []
        for key in ("final", "drop", f"last{args.tail}_mean"):
            values = [r["summary"][variant][key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):6.2f} ± {spread:4.2f}")
        print(f"{variant:<12} " + " ".join(f"{c:>14}" for c in cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
