"""Throughput of every stage, each beside a plain PyTorch loop doing the same math on the same models.

    python benchmarks/stages.py --json stages.json                       # digits, CPU, 1 thread
    python benchmarks/stages.py --config mnist data.root=../shared/data/mnist --threads 2
    python benchmarks/stages.py --gpu --config mnist data.root=...       # CUDA, synchronised timings

Stages (one row each; synthesis has one per resolution):
- synthesis @R: `Synthesizer.episode` after warm-up (g_steps generator updates scored by the teacher and
  the student, adversarial and diversity terms on), then the teacher scores the kept batch;
- distillation: `Distiller.step` on batches drawn from a filled pool (mixed resolutions, augmented, the
  teacher re-scores them);
- teacher training: `train_supervised` over the real training split (one epoch, a one-batch test split).

The plain loop ("ceiling") does the same forward and backward passes, losses and optimizer steps, with
batches prepared in advance and nothing else: no pool, no bookkeeping, no progress bar. `overhead` =
plain images/s ÷ ours (1.00: none; the bar this project holds each stage to is 1.5), each the fastest of
three timings taken in turns. pixels/s counts the
pixels the stage's networks see (synthesis: R², the others: the evaluation resolution²).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from muse.config import RunConfig, load_config
from muse.data import ImageSplits, InMemoryImages, load_dataset
from muse.datasets import get_dataset
from muse.distillation import cosine_schedule
from muse.engine import RunParts, build_run
from muse.generator import class_cycle
from muse.io import save_json
from muse.loop import draw_batch
from muse.losses import adversarial_loss, embedding_distance_loss, kd_loss, key_region_loss
from muse.models import features_and_logits
from muse.precision import Precision
from muse.runtime import resolve_device
from muse.synthesis import SynthesisRecord
from muse.teacher import ensure_teacher, train_supervised
from muse.transforms import model_input, random_shift_flip

MAX_OVERHEAD = 1.5


REPEATS = 3


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    """Seconds `work` takes, with queued device work finished before and after."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def fastest_of(device: torch.device, ours: Callable[[], Any], plain: Callable[[], Any]) -> tuple[float, float]:
    """The shortest of `REPEATS` timings of each, taken in turns (ours, plain, ours, ...) so that a slow
    moment of the machine does not land on one side only."""
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(REPEATS):
        times["ours"].append(timed(device, ours))
        times["plain"].append(timed(device, plain))
    return min(times["ours"]), min(times["plain"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row(stage: str, images: int, ours_s: float, plain_s: float, pixels_per_image: int) -> dict[str, Any]:
    ours, plain = images / ours_s, images / plain_s
    return {"stage": stage, "images": images, "ours_images_s": ours, "plain_images_s": plain,
            "ours_pixels_s": ours * pixels_per_image, "overhead": plain / ours}


# --- synthesis -----------------------------------------------------------------------------------------

def plain_episode(parts: RunParts, resolution: int) -> None:
    """One episode's math: fresh noise, a fresh Adam, g_steps updates of the generator on the weighted
    BN-statistics, CE, key-region, adversarial and diversity terms; then the teacher scores the batch."""
    cfg, weights, s = parts.cfg, parts.cfg.loss, parts.synthesizer
    generator, teacher, student = s.generator, s.teacher, parts.student
    labels = class_cycle(cfg.synthesis.batch_size, s.num_classes, s.device)
    teacher_resize = s.eval_resolution if cfg.resolution.teacher_input == "resize" else None
    student_resize = s.eval_resolution if cfg.resolution.student_input == "resize" else None
    bn_layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    terms_bn: list[torch.Tensor] = []

    def bn_hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        terms_bn.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    handles = [layer.register_forward_hook(bn_hook) for layer in bn_layers]
    try:
        generator.redraw_noise()
        optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.synthesis.lr_g, betas=(0.5, 0.999))
        student.eval().requires_grad_(False)
        for _ in range(cfg.synthesis.g_steps):
            terms_bn.clear()
            images = generator(labels, resolution)
            seen = random_shift_flip(images, flip=s.flip) if cfg.synthesis.augment else images
            feature_map, teacher_logits = features_and_logits(teacher, model_input(seen, s.mean, s.std, teacher_resize))
            student_logits, embedding = student(model_input(seen, s.mean, s.std, student_resize))
            total = (weights.bn * torch.stack(terms_bn).sum() + weights.ce * F.cross_entropy(teacher_logits, labels)
                     + weights.adv * adversarial_loss(student_logits, teacher_logits)
                     - weights.aed * embedding_distance_loss(embedding, s.embeddings, labels, weights.ed_radius))
            if weights.kr > 0:
                total = total + weights.kr * key_region_loss(feature_map, s.class_weight, labels, weights.cam_sigma)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        for handle in handles:
            handle.remove()
        handles = []
        with torch.no_grad():
            teacher(model_input(images.detach(), s.mean, s.std, teacher_resize))
    finally:
        for handle in handles:
            handle.remove()
        student.requires_grad_(True)


def synthesis_rows(parts: RunParts, episodes: int) -> list[dict[str, Any]]:
    rows = []
    s, student, batch = parts.synthesizer, parts.student, parts.cfg.synthesis.batch_size
    for resolution in parts.cfg.resolution.set:
        s.episode(resolution, student, 0, adversarial=True)  # warm-up: kernels chosen, BN EMA filled
        plain_episode(parts, resolution)
        ours_s, plain_s = fastest_of(parts.device,
                                     lambda: [s.episode(resolution, student, 0, adversarial=True) for _ in range(episodes)],
                                     lambda: [plain_episode(parts, resolution) for _ in range(episodes)])
        rows.append(row(f"synthesis @{resolution}", episodes * batch, ours_s, plain_s, resolution**2))
    return rows


# --- distillation --------------------------------------------------------------------------------------

def plain_distill_step(parts: RunParts, batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       optimizer: torch.optim.Optimizer) -> None:
    """One KD step's math on prepared uint8 image parts: augment, teacher re-scores, student forward,
    KD + L_ed, backward, SGD."""
    cfg, d = parts.cfg, parts.distiller
    inputs, teacher_logits, labels = [], [], []
    for images_u8, _, part_labels in batch:
        images = random_shift_flip(images_u8.float() / 255.0, flip=d.flip)
        with torch.no_grad():
            teacher_logits.append(d.teacher(model_input(images, d.mean, d.std, d.eval_resolution)))
        inputs.append(model_input(images, d.mean, d.std, d.eval_resolution))
        labels.append(part_labels)
    logits, embedding = d.student(torch.cat(inputs))
    labels_all = torch.cat(labels)
    loss = (kd_loss(logits, torch.cat(teacher_logits), cfg.loss.tau)
            + cfg.loss.ed * embedding_distance_loss(embedding, d.embeddings, labels_all, cfg.loss.ed_radius))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def distillation_row(parts: RunParts, steps: int) -> dict[str, Any]:
    cfg, d, pool = parts.cfg, parts.distiller, parts.pool
    if not (cfg.distill.augment and cfg.resolution.teacher_input == cfg.resolution.student_input == "resize"):
        raise SystemExit("the plain distillation loop assumes distill.augment=true and teacher_input = "
                         "student_input = resize (the shipped configs)")
    rng = np.random.default_rng(0)
    info, batch = parts.splits.info, cfg.synthesis.batch_size
    for episode in range(20):  # what the images show does not change the cost: random pixels are enough
        resolution = cfg.resolution.set[episode % len(cfg.resolution.set)]
        pool.add(SynthesisRecord(images=rng.integers(0, 256, (batch, info.in_chans, resolution, resolution),
                                                     dtype=np.uint8),
                                 labels=np.arange(batch) % info.num_classes,
                                 teacher_logits=rng.standard_normal((batch, info.num_classes), dtype=np.float32),
                                 resolution=resolution, step=episode))
    d.step(draw_batch(pool, cfg, rng))  # warm-up
    prepared = [[(torch.from_numpy(b.images).to(parts.device), None, torch.from_numpy(b.labels).to(parts.device))
                 for b in draw_batch(pool, cfg, rng)] for _ in range(steps)]
    optimizer = torch.optim.SGD(d.student.parameters(), lr=cfg.distill.lr, momentum=cfg.distill.momentum,
                                weight_decay=cfg.distill.weight_decay)
    ours_s, plain_s = fastest_of(parts.device, lambda: [d.step(draw_batch(pool, cfg, rng)) for _ in range(steps)],
                                 lambda: [plain_distill_step(parts, batch, optimizer) for batch in prepared])
    return row("distillation", steps * cfg.distill.batch_size, ours_s, plain_s, parts.splits.info.resolution**2)


# --- teacher training ----------------------------------------------------------------------------------

def plain_teacher_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig,
                        flip: bool) -> None:
    """One epoch of the teacher's math on normalised tensors already on the device (with the teacher's
    autocast and memory format)."""
    t = cfg.teacher
    precision = Precision.of(t, images.device)
    precision.model(model)
    steps = -(-len(images) // t.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay,
                                nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps))
    model.train()
    for indices in torch.randperm(len(images), device=images.device).split(t.batch_size):
        with precision.forward_context():
            logits = model(precision.images(random_shift_flip(images[indices], flip=flip)))
        loss = F.cross_entropy(logits.float(), labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def teacher_row(cfg: RunConfig, splits: ImageSplits, device: torch.device) -> dict[str, Any]:
    info, train = splits.info, splits.train
    if not isinstance(train, InMemoryImages):
        raise SystemExit(f"teacher training is benchmarked on in-memory datasets; {info.name} is not one")
    one_batch_test = InMemoryImages(splits.test.images[: cfg.data.eval_batch_size],
                                    splits.test.labels[: cfg.data.eval_batch_size], info)
    short = ImageSplits(train, one_batch_test, info)

    def new_model() -> nn.Module:
        torch.manual_seed(cfg.seed)
        return timm.create_model(cfg.teacher.arch, num_classes=info.num_classes, in_chans=info.in_chans).to(device)

    t, flip = cfg.teacher, get_dataset(info.name).flip_safe
    images, labels = train.batch(torch.arange(len(train)))
    images, labels = images.to(device), labels.to(device)
    ours_s, plain_s = fastest_of(
        device,
        lambda: train_supervised(new_model(), short, 1, t.batch_size, t.lr, t.weight_decay, cfg.seed, device,
                                 desc="teacher (ours)", compute=t),
        lambda: plain_teacher_epoch(new_model(), images, labels, cfg, flip))
    return row(f"teacher training ({t.arch})", len(train), ours_s, plain_s, info.resolution**2)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['config']} on {report['device']}, {report['threads']} torch thread(s); "
             f"overhead = plain ÷ ours (bar: ≤ {MAX_OVERHEAD})",
             f"{'stage':<32} {'ours img/s':>11} {'plain img/s':>12} {'overhead':>9} {'ours kpx/s':>11}"]
    for r in report["rows"]:
        lines.append(f"{r['stage']:<32} {r['ours_images_s']:>11.1f} {r['plain_images_s']:>12.1f} "
                     f"{r['overhead']:>9.2f} {r['ours_pixels_s'] / 1e3:>11.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--gpu", action="store_true", help="every stage on CUDA (device=cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--episodes", type=int, default=2, help="timed synthesis episodes per resolution")
    parser.add_argument("--kd-steps", type=int, default=60, help="timed distillation steps")
    parser.add_argument("--stages", default="synthesis,distillation,teacher")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-stages"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. synthesis.precision=bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve() / args.config
    cfg = load_config(args.config, [*(["device=cuda"] if args.gpu else []), f"teacher.checkpoint={out / 'teacher.pt'}",
                                    f"output_dir={out / 'run'}", "tracking.enabled=false", *args.overrides])
    device = resolve_device(cfg.device)
    splits = load_dataset(cfg.data)
    stages = {s.strip() for s in args.stages.split(",")}
    report: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "threads": args.threads,
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                              else f"cpu ({os.cpu_count()} cores)", "rows": []}
    if stages & {"synthesis", "distillation"}:
        ensure_teacher(cfg, splits, device)  # trained once (and cached) before anything is timed
        parts = build_run(cfg, splits)
        if "synthesis" in stages:
            report["rows"] += synthesis_rows(parts, args.episodes)
        if "distillation" in stages:
            report["rows"].append(distillation_row(parts, args.kd_steps))
    if "teacher" in stages:
        report["rows"].append(teacher_row(cfg, splits, device))
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
