"""The single-process reference run: build every part, then warm-up and epochs, top to bottom.

Warm-up epochs only fill the pool (`gwp_loops` episodes each); every later epoch runs `g_loops`
episodes, `kd_steps` student steps on pool batches, and an evaluation on the real test split.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from muse.config import RunConfig
from muse.data import ImageSplits, load_dataset
from muse.distillation import Distiller
from muse.embeddings import label_embeddings
from muse.evaluate import accuracy
from muse.io import atomic_write, save_json, save_torch
from muse.pool import PoolBatch, SyntheticPool
from muse.schedules import ResolutionSchedule
from muse.student import StudentNet
from muse.synthesis import SynthesisRecord, Synthesizer
from muse.teacher import ensure_teacher
from muse.tracking import NullTracker, create_tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class SynthesisTally:
    """Images and pixels synthesised per resolution, and time spent."""

    images: Counter = field(default_factory=Counter)
    pixels: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, record: SynthesisRecord) -> None:
        self.images[record.resolution] += len(record)
        self.pixels[record.resolution] += record.pixels
        self.seconds += record.timings.get("synthesis_s", 0.0)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SynthesisTally:
        return cls(Counter({int(r): n for r, n in saved["images"].items()}),
                   Counter({int(r): n for r, n in saved["pixels"].items()}), saved["synthesis_s"])

    def merge(self, other: SynthesisTally) -> SynthesisTally:
        return SynthesisTally(self.images + other.images, self.pixels + other.pixels, self.seconds + other.seconds)

    @classmethod
    def total(cls, saved: Iterable[dict[str, Any]]) -> SynthesisTally:
        """The sum of tallies saved with `as_dict` (e.g. one per Ray Train worker)."""
        return functools.reduce(cls.merge, (cls.from_dict(s) for s in saved), cls())

    def as_dict(self) -> dict[str, Any]:
        return {"images": {str(k): v for k, v in sorted(self.images.items())},
                "pixels": {str(k): v for k, v in sorted(self.pixels.items())},
                "total_images": sum(self.images.values()), "total_pixels": sum(self.pixels.values()),
                "synthesis_s": self.seconds}


@dataclass
class RunParts:
    """Everything a run is made of, built once by `build_run` (also used by the Ray workers)."""

    cfg: RunConfig
    device: torch.device
    splits: ImageSplits
    teacher: torch.nn.Module
    teacher_meta: dict[str, Any]
    embeddings: torch.Tensor
    student: StudentNet
    synthesizer: Synthesizer
    distiller: Distiller
    pool: SyntheticPool
    schedule: ResolutionSchedule


def build_run(cfg: RunConfig, splits: ImageSplits | None = None) -> RunParts:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    splits = splits or load_dataset(cfg.data)
    info = splits.info
    teacher, meta = ensure_teacher(cfg, splits, device)
    teacher.to(device)
    embeddings = label_embeddings(cfg.embedding, teacher, info.num_classes, cfg.seed)
    student = StudentNet(cfg.student.arch, info.num_classes, info.in_chans, embeddings.shape[1])
    total_epochs = cfg.total_epochs
    synthesizer = Synthesizer(cfg, teacher, embeddings, info.in_chans, info.mean, info.std, info.resolution, device)
    distiller = Distiller(cfg, student, teacher, embeddings, info.mean, info.std, info.resolution,
                          cfg.distill.epochs * cfg.distill.kd_steps, device)
    return RunParts(cfg, device, splits, teacher, meta, embeddings, student, synthesizer, distiller,
                    SyntheticPool(cfg.pool.capacity), ResolutionSchedule(cfg.resolution, total_epochs, cfg.seed))


def draw_batch(pool: SyntheticPool, cfg: RunConfig, rng: np.random.Generator) -> PoolBatch | list[PoolBatch]:
    """A KD batch: mixed resolutions when the student sees everything resized, else one resolution."""
    if cfg.resolution.student_input == "resize":
        return pool.sample_mixed(cfg.distill.batch_size, rng)
    return pool.sample(cfg.distill.batch_size, rng)


def run_distillation(cfg: RunConfig, splits: ImageSplits | None = None, progress: bool = True) -> dict[str, Any]:
    """Run warm-up and epochs in this process; write the student and `summary.json` to `cfg.output_dir`."""
    started = time.perf_counter()
    parts = build_run(cfg, splits)
    teacher_acc = parts.teacher_meta.get("test_acc")
    if teacher_acc is None:
        teacher_acc = accuracy(parts.teacher, parts.splits.test, cfg.data.eval_batch_size, parts.device)
    tally, history = SynthesisTally(), []
    sample_rng = np.random.default_rng(cfg.seed)
    total_epochs = cfg.total_epochs
    tracker = create_tracker(cfg)
    try:
        _epochs(cfg, parts, tracker, tally, history, sample_rng, total_epochs, progress)
        summary = finish_run(cfg, parts, teacher_acc, history, tally, time.perf_counter() - started)
    except BaseException:
        tracker.finish([], status="FAILED")
        raise
    finish_tracking(tracker, cfg, summary, step=total_epochs)
    return summary


def finish_tracking(tracker: NullTracker, cfg: RunConfig, summary: dict[str, Any], step: int) -> None:
    """Close a run's MLflow run: any evaluated epoch it lacks, final and best accuracy, the accuracy
    curve, and the output files."""
    tracker.log_missing_epochs({h["epoch"]: history_metrics(h) for h in summary["history"]}, key="student_acc")
    tracker.log_epoch(step, {"final_student_acc": summary["student_acc"], "best_student_acc": summary["best_acc"],
                             "teacher_acc": summary["teacher_acc"], "wall_s": summary["wall_s"]})
    tracker.log_accuracy_curve(summary["history"], summary["teacher_acc"], f"{cfg.method} on {cfg.data.name}")
    tracker.finish([cfg.output_dir / name for name in OUTPUT_FILES])


def _epochs(cfg: RunConfig, parts: RunParts, tracker: NullTracker, tally: SynthesisTally,
            history: list[dict[str, Any]], sample_rng: np.random.Generator, total_epochs: int,
            progress: bool) -> None:
    bar = tqdm(range(total_epochs), desc=f"{cfg.method} distill", unit="epoch", disable=not progress,
               dynamic_ncols=True)
    record: SynthesisRecord | None = None
    for epoch in bar:
        parts.synthesizer.maybe_rebuild(epoch)
        warming_up = epoch < cfg.synthesis.warmup
        for _ in range(cfg.synthesis.gwp_loops if warming_up else cfg.synthesis.g_loops):
            resolution = parts.schedule.resolution(epoch, parts.synthesizer.step)
            record = parts.synthesizer.episode(resolution, parts.student, parts.distiller.steps,
                                               adversarial=not warming_up)
            parts.pool.add(record)
            tally.add(record)
        if warming_up:
            bar.set_postfix(phase="warm-up", pool=len(parts.pool))
            continue
        losses: dict[str, float] = {}
        for _ in range(cfg.distill.kd_steps):
            losses = parts.distiller.step(draw_batch(parts.pool, cfg, sample_rng))
        student_acc = accuracy(parts.student.backbone, parts.splits.test, cfg.data.eval_batch_size, parts.device)
        history.append({"epoch": epoch, "student_acc": student_acc, "lr": parts.distiller.lr,
                        **{f"loss_{k}": v for k, v in losses.items()},
                        "synthesis_loss": record.losses if record else {}, "pool": len(parts.pool)})
        bar.set_postfix(acc=f"{student_acc:.2f}", best=f"{max(h['student_acc'] for h in history):.2f}")
        tracker.log_epoch(epoch, epoch_metrics(history[-1], tally))
        tracker.log_visuals(epoch, latest_records(parts.pool), parts.teacher, parts.splits.info,
                            cfg.resolution.teacher_input)


def history_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One history entry as flat metrics: accuracy, learning rate, loss terms, synthesis loss terms."""
    metrics = {k: v for k, v in entry.items() if k not in ("epoch", "synthesis_loss")}
    return metrics | {f"synthesis_{k}": v for k, v in entry["synthesis_loss"].items()}


def epoch_metrics(entry: dict[str, Any], tally: SynthesisTally) -> dict[str, float]:
    """What a tracker logs per evaluation: `history_metrics` plus images/pixels synthesised per resolution
    and the generation throughput (images per second of synthesis time)."""
    metrics = history_metrics(entry)
    metrics |= {f"images_{r}px": n for r, n in tally.images.items()}
    metrics |= {f"pixels_{r}px": n for r, n in tally.pixels.items()}
    metrics["synthesis_s"] = tally.seconds
    if tally.seconds > 0:
        metrics["synthesis_images_per_s"] = sum(tally.images.values()) / tally.seconds
    return metrics


def latest_records(pool: SyntheticPool) -> dict[int, SynthesisRecord]:
    """The newest synthetic batch of each resolution in the pool."""
    latest: dict[int, SynthesisRecord] = {}
    for record in pool.records:
        latest[record.resolution] = record
    return dict(sorted(latest.items()))


def finish_run(cfg: RunConfig, parts: RunParts, teacher_acc: float, history: list[dict[str, Any]],
               tally: SynthesisTally, wall_s: float) -> dict[str, Any]:
    summary = build_summary(cfg, teacher_acc, history, tally, wall_s, parts.distiller.steps, parts.synthesizer.step)
    save_outputs(cfg, summary, parts.student.state_dict())
    parts.pool.save(cfg.pool_directory)
    return summary


def build_summary(cfg: RunConfig, teacher_acc: float, history: list[dict[str, Any]], tally: SynthesisTally,
                  wall_s: float, kd_steps: int, episodes: int) -> dict[str, Any]:
    """The run's summary: final and best accuracy, cost, per-epoch history, config."""
    accs = [h["student_acc"] for h in history]
    return {
        "method": cfg.method, "dataset": cfg.data.name, "teacher": cfg.teacher.arch, "student": cfg.student.arch,
        "teacher_acc": teacher_acc,
        "student_acc": accs[-1] if accs else None,
        "best_acc": max(accs) if accs else None,
        "best_epoch": history[int(np.argmax(accs))]["epoch"] if accs else None,
        "best_note": "best over epochs selects on the test split, as the DFKD literature reports it",
        "wall_s": wall_s, "kd_steps": kd_steps, "synthesis_episodes": episodes,
        "synthesis": tally.as_dict(), "history": history, "config": cfg.model_dump(mode="json"),
    }


OUTPUT_FILES = ("summary.json", "student.pt", "config.yaml")  # what `save_outputs` writes to output_dir


def save_outputs(cfg: RunConfig, summary: dict[str, Any], student_state: dict[str, torch.Tensor]) -> None:
    """`student.pt` (the StudentNet state; `backbone.*` keys are the plain timm model), `summary.json`
    and the resolved `config.yaml`."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    save_torch({"arch": cfg.student.arch, "state_dict": student_state, "student_acc": summary["student_acc"]},
               cfg.output_dir / "student.pt")
    save_json(summary, cfg.output_dir / "summary.json")
    atomic_write(cfg.output_dir / "config.yaml",
                 lambda tmp: tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
