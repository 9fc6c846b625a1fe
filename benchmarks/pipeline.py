"""How well the Ray pipeline overlaps generation and distillation, on one fixed amount of work.

    python benchmarks/pipeline.py --json pipeline.json [--generators 1,2] [overrides...]

Same work in every mode: the synthesis episodes and KD steps of one (small) digits run, same models.
- sequential: the single-process engine (`muse.engine.run_distillation`), loop time only;
- generate_only: the same episodes, nothing else; distill_only: the same KD steps on a filled pool;
- pipeline N: `orchestration.run` with N generator actors and one Train worker, from the first epoch
  to the last (reports and checkpoints included; cluster, actor and worker start-up reported apart).
overlap_efficiency = max(generate_only, distill_only) / pipeline (1.0: perfect overlap);
feed_overhead = share of the generators' wall time not spent synthesising (weight pulls, transfer,
waiting for the trainer); object_store_peak_mb is sampled while the pipeline runs.
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

from muse.config import RunConfig, load_config
from muse.data import load_dataset
from muse.engine import build_run, run_distillation
from muse.loop import draw_batch
from muse.io import save_json
from muse.teacher import ensure_teacher
from orchestration.runner import run as run_pipeline

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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the in-process modes (Ray gives each actor/worker 1 per CPU)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pipeline"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    device = ["device=cuda"] if args.gpu else []
    base = [*WORK, *device, f"teacher.checkpoint={out / 'teacher.pt'}", *args.overrides]
    cfg = load_config(args.config, [*base, f"output_dir={out / 'sequential'}"])
    splits = load_dataset(cfg.data)
    ensure_teacher(cfg, splits)  # trained once, outside every timed mode

    fresh_folder(cfg.output_dir)
    sequential = run_distillation(cfg, splits, progress=False)
    evals = len(sequential["history"])
    report: dict[str, Any] = {
        "device": "cuda" if args.gpu else f"cpu ({os.cpu_count()} cores)",
        "work": {"episodes": episodes_of(cfg), "kd_steps": cfg.distill.epochs * cfg.distill.kd_steps,
                 "synthesis_batch": cfg.synthesis.batch_size, "resolutions": cfg.resolution.set},
        "sequential_s": sequential["wall_s"], "sequential_evals": evals,
        "generate_only_s": time_generate_only(cfg, splits),
        "distill_only_s": time_distill_only(cfg, splits),
        "pipeline_s": {}, "startup_s": {}, "feed_overhead": {}, "object_store_peak_mb": {},
        "batches_per_s": {}, "pipeline_acc": {}, "sequential_acc": sequential["student_acc"],
    }
    total_cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=total_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")
    try:
        for count in [int(c) for c in args.generators.split(",")]:
            cpus = args.generator_cpus or max(0.25, (total_cpus - 1) / count)
            gpu = ["ray.train.use_gpu=true", "ray.generators.num_gpus=0.25"] if args.gpu else []
            run_cfg = load_config(args.config, [*base, *gpu, f"output_dir={out / f'pipeline-{count}'}",
                                                f"ray.generators.count={count}", f"ray.generators.num_cpus={cpus}",
                                                "ray.train.count=1", "ray.train.cpus_per_worker=1"])
            fresh_folder(run_cfg.output_dir)
            with ObjectStoreSampler() as sampler:
                summary = run_pipeline(run_cfg)
            loop_s = summary["loop_s"]
            synthesis_s = summary["synthesis"]["synthesis_s"]
            key = str(count)
            report["pipeline_s"][key] = loop_s
            report["startup_s"][key] = summary["wall_s"] - loop_s
            report["feed_overhead"][key] = max(0.0, 1.0 - synthesis_s / (loop_s * count))
            report["object_store_peak_mb"][key] = sampler.peak_mb
            report["batches_per_s"][key] = summary["synthesis_episodes"] / loop_s
            report["pipeline_acc"][key] = summary["student_acc"]
    finally:
        ray.shutdown()
    busiest = max(report["generate_only_s"], report["distill_only_s"])
    report["overlap_efficiency"] = {k: busiest / v for k, v in report["pipeline_s"].items()}
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


def format_table(report: dict[str, Any]) -> str:
    work = report["work"]
    lines = [f"work: {work['episodes']} synthesis episodes × {work['synthesis_batch']} images "
             f"@ {work['resolutions']}, {work['kd_steps']} KD steps; {report['device']}",
             f"{'mode':<16} {'seconds':>8} {'batches/s':>10} {'overlap':>8} {'feed ovh':>9} {'store MB':>9}",
             f"{'sequential':<16} {report['sequential_s']:>8.1f}",
             f"{'generate only':<16} {report['generate_only_s']:>8.1f}",
             f"{'distill only':<16} {report['distill_only_s']:>8.1f}"]
    for key, seconds in report["pipeline_s"].items():
        lines.append(f"{'pipeline ' + key + ' gen':<16} {seconds:>8.1f} {report['batches_per_s'][key]:>10.2f} "
                     f"{report['overlap_efficiency'][key]:>8.2f} {report['feed_overhead'][key]:>9.2f} "
                     f"{report['object_store_peak_mb'][key]:>9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
