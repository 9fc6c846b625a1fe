"""Synthesis throughput of N GeneratorActors sharing a machine's devices, for several N.

    python benchmarks/actor_scaling.py --actors 1,2 --json scaling.json              # CPU: 1 CPU per actor
    python benchmarks/actor_scaling.py --gpu --actors 1,2,4,8 --json scaling.json    # one GPU, num_gpus=1/N

Each count N starts N actors (`create_generator_actors`, as a run does), with a student in the weight
store so every episode is adversarial (the student is scored too), waits until they are up, runs one
untimed episode each, then has every actor run `--episodes` episodes back to back (each actor keeps one
call in flight, so nothing waits on a trainer). Reported per N: aggregate images/s and pixels/s,
speed-up over N=1, and scaling efficiency = speed-up / N (CPU) or speed-up (one shared GPU: how much
more of it N actors use than one). Resolutions follow the run's schedule.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch

from muse.config import load_config
from muse.data import load_dataset
from muse.embeddings import label_embeddings
from muse.io import save_json
from muse.runtime import resolve_device
from muse.student import StudentNet
from muse.teacher import ensure_teacher
from orchestration.generator_actor import create_generator_actors, wait_until_ready
from orchestration.weight_store import create_weight_store, state_to_numpy


def measure(cfg, info, count: int, episodes: int, num_cpus: float, num_gpus: float, student_state) -> dict[str, Any]:
    store_name = f"scaling-store-{count}"
    store = create_weight_store(store_name)
    ray.get(store.push.remote(student_state, 1))
    actors = create_generator_actors(cfg, count, num_cpus, num_gpus, store_name, info)
    try:
        wait_until_ready(actors)
        ray.get([actor.generate.remote(cfg.synthesis.warmup, i, None, True) for i, actor in enumerate(actors)])
        started = time.perf_counter()
        pending = {actor.generate.remote(cfg.synthesis.warmup, count + i, None, True): (actor, 1)
                   for i, actor in enumerate(actors)}
        images = pixels = 0
        next_episode = 2 * count
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor, done = pending.pop(ready)
            record = ray.get(ready)
            images += len(record["labels"])
            pixels += len(record["labels"]) * record["resolution"] ** 2
            if done < episodes:
                pending[actor.generate.remote(cfg.synthesis.warmup, next_episode, None, True)] = (actor, done + 1)
                next_episode += 1
        seconds = time.perf_counter() - started
    finally:
        for actor in [*actors, store]:
            ray.kill(actor)
    return {"actors": count, "episodes": episodes * count, "seconds": seconds, "images_s": images / seconds,
            "pixels_s": pixels / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--actors", default="1,2", help="actor counts to measure")
    parser.add_argument("--episodes", type=int, default=4, help="timed episodes per actor")
    parser.add_argument("--gpu", action="store_true", help="actors share one GPU (num_gpus = 1/N)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. synthesis.precision=bf16")
    args = parser.parse_args()
    out = args.out.resolve() / args.config
    cfg = load_config(args.config, [*(["device=cuda"] if args.gpu else []), f"teacher.checkpoint={out / 'teacher.pt'}",
                                    "tracking.enabled=false", *args.overrides])
    splits = load_dataset(cfg.data)
    teacher, _ = ensure_teacher(cfg, splits, resolve_device(cfg.device))
    embeddings = label_embeddings(cfg.embedding, teacher, splits.info.num_classes, cfg.seed)
    student = StudentNet(cfg.student.arch, splits.info.num_classes, splits.info.in_chans, embeddings.shape[1])
    student_state = state_to_numpy(student.state_dict())
    counts = [int(c) for c in args.actors.split(",")]
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=max(cores, max(counts)), num_gpus=1 if args.gpu else 0,
             include_dashboard=False, _node_ip_address="127.0.0.1")
    rows = []
    try:
        for count in counts:
            num_gpus = 1.0 / count if args.gpu else 0.0
            num_cpus = 0.0 if args.gpu else 1.0
            rows.append(measure(cfg, splits.info, count, args.episodes, num_cpus, num_gpus, student_state))
            print(f"{count} actor(s): {rows[-1]['images_s']:.1f} images/s", flush=True)
    finally:
        ray.shutdown()
    base = rows[0]["images_s"] / rows[0]["actors"]
    for row in rows:
        row["speedup"] = row["images_s"] / base
        row["efficiency"] = row["speedup"] if args.gpu else row["speedup"] / row["actors"]
    report = {"config": args.config, "overrides": args.overrides, "device": torch.cuda.get_device_name()
              if args.gpu else f"cpu ({cores} cores)", "rows": rows}
    print(f"{'actors':>6} {'images/s':>9} {'kpx/s':>7} {'speed-up':>9} {'efficiency':>10}")
    for row in rows:
        print(f"{row['actors']:>6} {row['images_s']:>9.1f} {row['pixels_s'] / 1e3:>7.1f} {row['speedup']:>9.2f} "
              f"{row['efficiency']:>10.2f}")
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
