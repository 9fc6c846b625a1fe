"""Start-up as a user sees it: seconds from the command to the first synthesis episode begun on an actor.

    python benchmarks/startup.py --repeats 3 --json benchmarks/results/startup_cpu.json [overrides...]

Each repeat runs `python orchestration/run.py --no-tracking --stop-after-epoch 1` in a fresh process
(its own local cluster, the digits default unless overridden) with a teacher trained once beforehand, and
reads the run's checkpoint for when things happened (`time.time()` in each process, one machine). Per
repeat: the first synthesis episode begun, the Train worker in its loop function, the first batch back in
it, and the command done (epoch 1 ends, checkpoint, summary, cluster stopped); then the median of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from muse.checkpoint import latest_checkpoint, read_ranks
from muse.config import load_config
from muse.data import load_dataset
from muse.io import save_json
from muse.teacher import ensure_teacher

REPO = Path(__file__).resolve().parents[1]
# rank 0's marks in its checkpoint (`orchestration.train_loop.feed_state`), reported from the command's start
MARKS = {"first_episode_s": "first_episode_at", "worker_in_loop_s": "worker_started_at",
         "first_batch_s": "first_record_at"}


def one_start(out: Path, teacher: Path, overrides: list[str]) -> dict[str, float]:
    """One command, timed from just before its process starts."""
    command = [sys.executable, str(REPO / "orchestration" / "run.py"), "--no-tracking", "--stop-after-epoch", "1",
               f"output_dir={out}", f"teacher.checkpoint={teacher}", *overrides]
    started = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return marks_since(started, read_ranks(latest_checkpoint(out))[0]["source"]) | {"command_s": ended - started}


def marks_since(started: float, source: dict[str, Any]) -> dict[str, float]:
    """Rank 0's start-up marks (absolute times) as seconds since `started`."""
    return {name: source[key] - started for name, key in MARKS.items()}


def medians(repeats: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}


def format_table(report: dict[str, Any]) -> str:
    keys = list(report["median"])
    lines = [f"{'repeat':<8}" + "".join(f"{k:>18}" for k in keys)]
    for i, row in enumerate(report["repeats"], 1):
        lines.append(f"{i:<8}" + "".join(f"{row[k]:>17.1f}s" for k in keys))
    lines.append(f"{'median':<8}" + "".join(f"{report['median'][k]:>17.1f}s" for k in keys))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-startup"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out.resolve()
    overrides = ["--config", args.config, *args.overrides]
    cfg = load_config(args.config, [f"output_dir={out / 'teacher-run'}", f"teacher.checkpoint={out / 'teacher.pt'}",
                                    *args.overrides])
    ensure_teacher(cfg, load_dataset(cfg.data))  # trained once, outside every timed start
    repeats = []
    for i in range(args.repeats):
        run_dir = out / f"start-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run refuses a used output_dir
        repeats.append(one_start(run_dir, cfg.teacher_checkpoint, overrides))
        print(json.dumps({k: round(v, 1) for k, v in repeats[-1].items()}), flush=True)
    report = {"command": "orchestration/run.py --no-tracking --stop-after-epoch 1 " + " ".join(overrides),
              "repeats": repeats, "median": medians(repeats)}
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
