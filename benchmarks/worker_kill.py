"""What a killed Ray Train worker costs the student: final accuracy of a run whose worker is SIGKILLed
mid-run, beside the same run undisturbed, for each seed.

    python benchmarks/worker_kill.py --seeds 0,1 --json benchmarks/results/worker_kill_digits_cpu.json

Each seed runs the config twice on a local cluster (one generator, one Train worker,
`checkpoint_every=1`): once undisturbed, once with the Train worker process SIGKILLed as soon as
`--kill-after` epochs are committed. Ray Train restarts the worker group from the last committed
checkpoint (`ray.train.max_failures`), so the killed run redoes the epochs since then and should end
where the undisturbed run ends, within the run-to-run noise of the pipeline (batches arrive in an order
that depends on timing, so two undisturbed runs differ too). Reported per run: final and best top-1,
epochs done, the history's epochs (each must appear once), wall time, and for a killed run the epoch
it had committed when killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from ray.util.state import list_actors

from muse.checkpoint import LOCAL_POINTER
from muse.config import RunConfig, load_config
from muse.io import save_json
from orchestration.runner import run
from orchestration.threads import start_thread

MODES = ("undisturbed", "killed")


def train_worker_pid(timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if len(actors) == 1:
            return actors[0].pid
        time.sleep(0.5)
    raise RuntimeError(f"no single live RayTrainWorker within {timeout_s:g} s")


def committed_epoch(run_dir: Path) -> int:
    """The epoch of the run's last committed checkpoint (0 before the first)."""
    pointer = run_dir / LOCAL_POINTER
    return json.loads(pointer.read_text())["epoch"] if pointer.is_file() else 0


def one_run(cfg: RunConfig, kill_after: int | None) -> dict[str, Any]:
    """Run cfg; with kill_after, SIGKILL its Train worker once that many epochs are committed."""
    started = time.monotonic()
    thread, outcome = start_thread("run", lambda: run(cfg))
    killed_at = None
    if kill_after is not None:
        while committed_epoch(cfg.output_dir) < kill_after and thread.is_alive():
            time.sleep(0.5)
        if not thread.is_alive():
            raise RuntimeError(f"the run ended before epoch {kill_after} was committed: {outcome}")
        os.kill(train_worker_pid(), signal.SIGKILL)
        killed_at = committed_epoch(cfg.output_dir)  # what the restarted group resumes from
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["result"]
    return {"final": summary["student_acc"], "best": summary["best_acc"], "epochs_done": summary["epochs_done"],
            "history_epochs": [h["epoch"] for h in summary["history"]],
            "wall_s": round(time.monotonic() - started, 1), "killed_after_committed_epoch": killed_at}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | run | final | best | epochs | killed after epoch | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        killed = "" if r["killed_after_committed_epoch"] is None else str(r["killed_after_committed_epoch"])
        lines.append(f"| {r['seed']} | {r['mode']} | {r['final']:.2f} | {r['best']:.2f} | "
                     f"{r['epochs_done']} | {killed} | {r['wall_s']:.0f} |")
    for mode in MODES:
        finals = mean_std([r["final"] for r in rows if r["mode"] == mode])
        lines.append(f"| all | {mode} | {finals['mean']:.2f} ± {finals['std']:.2f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--kill-after", type=int, default=20, help="the kill comes once this epoch (warm-up included) is committed")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/worker_kill"))
    parser.add_argument("--json", type=Path, help="also save the rows and the summary here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for mode in MODES:
                run_dir = args.out / f"{mode}-seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)  # our own folder from an earlier invocation
                cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"output_dir={run_dir}",
                                                "checkpoint_every=1", "tracking.enabled=false"])
                if args.kill_after >= cfg.total_epochs:
                    parser.error(f"--kill-after {args.kill_after} must be under the run's {cfg.total_epochs} epochs")
                row = {"seed": seed, "mode": mode,
                       **one_run(cfg, args.kill_after if mode == "killed" else None)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    print(format_table(rows))
    if args.json:
        finals = {mode: mean_std([r["final"] for r in rows if r["mode"] == mode]) for mode in MODES}
        save_json({"config": args.config, "overrides": args.overrides, "kill_after": args.kill_after,
                   "cores": os.cpu_count(), "rows": rows, "final": finals}, args.json)


if __name__ == "__main__":
    main()
