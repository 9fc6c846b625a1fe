"""How close the Ray pipeline comes to what the machine allows, on one fixed amount of work.

    python benchmarks/pipeline.py --json pipeline.json [--generators 1,2] [overrides...]

Same work in every mode: the synthesis episodes and KD steps of one (small) digits run, same models.
- generate_only, distill_only: the stages alone, in this process at one torch thread;
- sequential: the single-process engine (`muse.engine.run_distillation`), loop time only, at one torch
  thread (`sequential_s`) and at all cores (`sequential_all_cores_s`);
- pipeline N: `orchestration.run` with N generator actors and one Train worker, from the first synthesis
  episode begun on an actor (a fresh run's first episodes run while the Train worker starts) to the end
  of the last epoch (reports and checkpoints included). Start-up is reported apart: `startup_s` (run()
  called → the first synthesis episode begun), `teardown_s` (last epoch → run() returns) and
  `cluster_start_s` (ray.init of the local cluster, once); `startup_parts` gives the generator actors up,
  the Train worker in its loop function and the first batch back in it.

Derived (`derive`):
- machine_efficiency = max(distill, (generate + distill) / cores) / pipeline: the best this machine allows
  with every core busy (stage times at one thread), over what the pipeline took (1.0: the machine's best);
- run_efficiency = the machine's best / run_s, run_s = startup_s + pipeline_s (run() called → last epoch):
  the same, start-up included, which no choice of window can flatter;
- overlap_efficiency = max(generate, distill) / pipeline: the speed-up over the slower stage run alone
  (above 1 with several generators; kept for continuity, not an efficiency);
- feed_overhead = share of the generators' wall time not spent synthesising (weight pulls, transfer,
  waiting for the trainer).
Every mode reports its final student accuracy and the staleness of its batches (student steps between
the weights an episode saw and the step that took it; 0 by construction in the sequential loop).
object_store_peak_mb is sampled while the pipeline runs, and `cpu_seconds` says where the cores went over
the pipeline's window: CPU seconds per process role (generator actors, Train worker, Train controller,
weight store, driver, Ray's own processes) and what stayed idle (`benchmarks/cpu_profile.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import ray
import torch

from benchmarks.cpu_profile import CpuSampler, cpu_by_role
from muse.config import RunConfig, load_config
from muse.data import load_dataset
from muse.engine import build_run, run_distillation
from muse.loop import draw_batch
from muse.io import save_json
from muse.teacher import ensure_teacher
from orchestration.runner import run as run_pipeline

# The report's per-pipeline entries, each keyed by the generator count.
PIPELINE_KEYS = ("pipeline_s", "startup_s", "startup_parts", "teardown_s", "feed_overhead", "object_store_peak_mb",
                 "batches_per_s", "pipeline_acc", "staleness", "cpu_seconds")
WORK = ["synthesis.warmup=1", "synthesis.gwp_loops=4", "synthesis.g_loops=2", "distill.epochs=6",
        "distill.kd_steps=20"]


def fresh_folder(run_dir: Path) -> None:
    """Remove the benchmark's own run folder of an earlier invocation (runs refuse a used output_dir)."""
    shutil.rmtree(run_dir, ignore_errors=True)


def episodes_of(cfg: RunConfig) -> int:
    return cfg.synthesis.warmup * cfg.synthesis.gwp_loops + cfg.distill.epochs * cfg.synthesis.g_loops


def time_generate_only(cfg: RunConfig, splits) -> float:
    parts = build_run(cfg, splits)
    started = time.perf_counter()
    for episode in range(episodes_of(cfg)):
        epoch = episode // max(1, cfg.synthesis.g_loops)
        parts.synthesizer.episode(parts.schedule.resolution(epoch, episode), parts.student, 0,
                                  adversarial=episode >= cfg.synthesis.warmup * cfg.synthesis.gwp_loops)
    return time.perf_counter() - started


def time_distill_only(cfg: RunConfig, splits) -> float:
    parts = build_run(cfg, splits)
    for episode in range(episodes_of(cfg)):
        parts.pool.add(parts.synthesizer.episode(parts.schedule.resolution(0, episode)))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(cfg.distill.epochs * cfg.distill.kd_steps):
        parts.distiller.step(draw_batch(parts.pool, cfg, rng))
    return time.perf_counter() - started


class ObjectStoreSampler:
    """Polls the local object store's usage in a thread and keeps the peak (MiB)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        from ray._private.internal_api import memory_summary

        while not self._stop.wait(interval_s):
            try:
                text = memory_summary(stats_only=True)
            except Exception:  # the store may be busy starting or shutting down
                continue
            match = re.search(r"Plasma memory usage (\d+) MiB", text)
            if match:
                self.peak_mb = max(self.peak_mb, float(match.group(1)))

    def __enter__(self) -> ObjectStoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--generators", default="1,2", help="generator actor counts to measure")
    parser.add_argument("--generator-cpus", type=float, default=None,
                        help="CPUs per actor (default: share what the Train worker leaves)")
    parser.add_argument("--gpu", action="store_true", help="generators and the Train worker on the GPU")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pipeline"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out.resolve()
    cores = os.cpu_count() or 2
    device = ["device=cuda"] if args.gpu else []
    base = [*WORK, *device, f"teacher.checkpoint={out / 'teacher.pt'}", *args.overrides]
    cfg = load_config(args.config, [*base, f"output_dir={out / 'sequential'}"])
    splits = load_dataset(cfg.data)
    ensure_teacher(cfg, splits)  # trained once, outside every timed mode

    torch.set_num_threads(1)
    sequential = timed_sequential(cfg, splits)
    report: dict[str, Any] = {
        "device": "cuda" if args.gpu else f"cpu ({cores} cores)", "cores": cores,
        "work": {"episodes": episodes_of(cfg), "kd_steps": cfg.distill.epochs * cfg.distill.kd_steps,
                 "synthesis_batch": cfg.synthesis.batch_size, "resolutions": cfg.resolution.set},
        "sequential_s": sequential["wall_s"], "sequential_evals": len(sequential["history"]),
        "sequential_acc": sequential["student_acc"],
        "generate_only_s": time_generate_only(cfg, splits),
        "distill_only_s": time_distill_only(cfg, splits),
    }
    torch.set_num_threads(cores)
    all_cores = timed_sequential(cfg.model_copy(update={"output_dir": out / "sequential-all-cores"}), splits)
    report |= {"sequential_all_cores_s": all_cores["wall_s"], "sequential_all_cores_acc": all_cores["student_acc"]}
    torch.set_num_threads(1)
    report |= {key: {} for key in PIPELINE_KEYS}
    started = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")
    report["cluster_start_s"] = time.perf_counter() - started
    try:
        for count in [int(c) for c in args.generators.split(",")]:
            cpus = args.generator_cpus or max(0.25, (cores - 1) / count)
            gpu = ["ray.train.use_gpu=true", "ray.generators.num_gpus=0.25"] if args.gpu else []
            run_cfg = load_config(args.config, [*base, *gpu, f"output_dir={out / f'pipeline-{count}'}",
                                                f"ray.generators.count={count}", f"ray.generators.num_cpus={cpus}",
                                                "ray.train.count=1", "ray.train.cpus_per_worker=1"])
            fresh_folder(run_cfg.output_dir)
            called_at = time.time()
            with ObjectStoreSampler() as sampler, CpuSampler() as cpu:
                summary = run_pipeline(run_cfg)
            record_pipeline(report, str(count), count, summary, sampler.peak_mb)
            window_start = called_at + summary["timing"]["startup_s"]
            report["cpu_seconds"][str(count)] = cpu_by_role(cpu.samples, window_start,
                                                            window_start + report["pipeline_s"][str(count)], cores)
    finally:
        ray.shutdown()
    report |= derive(report)
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


def timed_sequential(cfg: RunConfig, splits) -> dict[str, Any]:
    """The single-process run; `wall_s` is its epoch loop alone (like the pipeline's `pipeline_s`)."""
    fresh_folder(cfg.output_dir)
    summary = run_distillation(cfg, splits, progress=False)
    return summary | {"wall_s": summary["loop_s"]}


def record_pipeline(report: dict[str, Any], key: str, count: int, summary: dict[str, Any], peak_mb: float) -> None:
    timing = summary["timing"]
    loop_s = summary["loop_s"] + timing["synthesis_before_loop_s"]  # from the first episode begun on
    report["pipeline_s"][key] = loop_s
    report["startup_s"][key] = timing["startup_s"]
    report["startup_parts"][key] = {"actors_ready_s": timing["actors_ready_s"],
                                    "workers_started_s": timing["workers_started_s"],
                                    "first_batch_s": timing["first_batch_s"]}
    report["teardown_s"][key] = summary["wall_s"] - timing["loop_started_s"] - summary["loop_s"]
    report["feed_overhead"][key] = max(0.0, 1.0 - summary["synthesis"]["synthesis_s"] / (loop_s * count))
    report["object_store_peak_mb"][key] = peak_mb
    report["batches_per_s"][key] = summary["synthesis_episodes"] / loop_s
    report["pipeline_acc"][key] = summary["student_acc"]
    ranks = [s for s in summary["staleness"] if s]
    report["staleness"][key] = {"mean": sum(s["mean_staleness"] for s in ranks) / max(1, len(ranks)),
                                "max": max((s["max_staleness"] for s in ranks), default=0)}


def derive(report: dict[str, Any]) -> dict[str, Any]:
    """The efficiencies, from stage and pipeline times (see the module docstring)."""
    generate, distill, cores = report["generate_only_s"], report["distill_only_s"], report["cores"]
    machine_best = max(distill, (generate + distill) / cores)
    pipelines = report["pipeline_s"]
    best = min(pipelines, key=pipelines.get) if pipelines else None
    runs = {k: report["startup_s"][k] + v for k, v in pipelines.items()}  # run() called → last epoch
    return {"machine_best_s": machine_best,
            "machine_efficiency": {k: machine_best / v for k, v in pipelines.items()},
            "run_s": runs, "run_efficiency": {k: machine_best / v for k, v in runs.items()},
            "overlap_efficiency": {k: max(generate, distill) / v for k, v in pipelines.items()},
            "best_generators": best,
            "best_vs_sequential_all_cores": (report["sequential_all_cores_s"] / pipelines[best]) if best else None}


def format_table(report: dict[str, Any]) -> str:
    work = report["work"]
    lines = [f"work: {work['episodes']} synthesis episodes × {work['synthesis_batch']} images "
             f"@ {work['resolutions']}, {work['kd_steps']} KD steps; {report['device']}; "
             f"the machine's best: {report['machine_best_s']:.1f} s",
             f"{'mode':<22} {'seconds':>8} {'machine eff':>11} {'feed ovh':>9} {'staleness':>10} {'final acc':>9}",
             f"{'generate only (1 thr)':<22} {report['generate_only_s']:>8.1f}",
             f"{'distill only (1 thr)':<22} {report['distill_only_s']:>8.1f}",
             f"{'sequential (1 thread)':<22} {report['sequential_s']:>8.1f} {'':>11} {'':>9} {'0 / 0':>10} "
             f"{report['sequential_acc']:>9.2f}",
             f"{'sequential (all cores)':<22} {report['sequential_all_cores_s']:>8.1f} {'':>11} {'':>9} {'0 / 0':>10} "
             f"{report['sequential_all_cores_acc']:>9.2f}"]
    for key, seconds in report["pipeline_s"].items():
        stale = report["staleness"][key]
        lines.append(f"{'pipeline ' + key + ' gen':<22} {seconds:>8.1f} {report['machine_efficiency'][key]:>11.2f} "
                     f"{report['feed_overhead'][key]:>9.2f} {stale['mean']:>5.1f} / {stale['max']:<3} "
                     f"{report['pipeline_acc'][key]:>9.2f}")
    for key, roles in report.get("cpu_seconds", {}).items():
        capacity = sum(roles.values())
        lines.append(f"pipeline {key} gen, the cores over the pipeline ({capacity:.1f} CPU·s): " +
                     ", ".join(f"{role} {100 * used / capacity:.0f}%" for role, used in roles.items()))
    lines.append(f"local cluster start: {report['cluster_start_s']:.1f} s; start-up, run() called → first episode "
                 "begun / actors up / Train worker in its loop / first batch back in it:")
    for key, seconds in report["startup_s"].items():
        parts = report["startup_parts"][key]
        lines.append(f"  {key} gen: {seconds:.1f} / {parts['actors_ready_s']:.1f} / {parts['workers_started_s']:.1f} / "
                     f"{parts['first_batch_s']:.1f} s (teardown {report['teardown_s'][key]:.1f} s); run() → last epoch "
                     f"{report['run_s'][key]:.1f} s, run efficiency {report['run_efficiency'][key]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
