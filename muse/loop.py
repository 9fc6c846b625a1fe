"""The epoch, once. Warm-up epochs only fill the pool (`gwp_loops` synthetic batches each); every later
epoch adds `g_loops` batches (or, with a synthesis budget, its share of the budget), runs `kd_steps`
student steps on pool batches and, where this process evaluates, scores the student on the real test
split.

Both runners call `run_epochs`: the single-process engine (`muse.engine`) and every Ray Train worker
(`orchestration.train_loop`). They differ in two places only:
- the **record source**: where an epoch's synthetic batches come from (`LocalSynthesis` runs the
  episodes in this process; the Ray feed pulls them from generator actors);
- the **hooks**: per-process concerns around the shared epoch (weight pushes to the generators,
  progress, tracking, reports and checkpoints).
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from muse.config import RunConfig
from muse.data import DatasetInfo
from muse.distillation import Distiller
from muse.evaluate import accuracy
from muse.pool import PoolBatch, SyntheticPool
from muse.schedules import ResolutionSchedule
from muse.runtime import seed_everything
from muse.student import StudentNet
from muse.synthesis import SynthesisRecord, Synthesizer


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
class RunState:
    """Where one process's run stands: what a checkpoint saves and a resume restores (with the
    distiller, the pool and the generators' states, which live in their own objects)."""

    sample_rng: np.random.Generator  # draws the KD batches from the pool
    epoch: int = 0  # the next epoch to run
    episodes: int = 0  # synthesis episodes this process consumed (admitted to the pool or not)
    kd_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluated epoch
    tally: SynthesisTally = field(default_factory=SynthesisTally)  # every episode this process consumed
    loop_s: float = 0.0  # seconds in the epoch loop, reports and checkpoints included

    @classmethod
    def fresh(cls, seed: int, rank: int = 0) -> RunState:
        return cls(sample_rng=np.random.default_rng([seed, rank]))


class RecordSource(Protocol):
    """Where an epoch's synthetic batches come from."""

    world: int  # processes that share each epoch's episodes (Ray Train workers; 1 in-process)

    def episodes(self, epoch: int, adversarial: bool) -> Iterator[tuple[SynthesisRecord, bool]]:
        """This process's episodes of `epoch`, as many as the loop takes, each with whether it enters
        the pool (a source may refuse a batch, e.g. one synthesised against too stale a student)."""
        ...


class EpochHooks:
    """Per-process concerns around the shared epoch; every method is a no-op here."""

    def after_episode(self, state: RunState, pool: SyntheticPool) -> None:
        """After every synthesis episode (`state.episodes` counts it)."""

    def before_kd(self, distiller: Distiller) -> None:
        """Before an epoch's first KD step."""

    def after_kd_step(self, distiller: Distiller) -> None:
        """After every KD step."""

    def after_epoch(self, epoch: int, metrics: dict[str, Any], state: RunState, last: bool) -> None:
        """After an epoch (`state.epoch` already counts it); `last`: the run ends or stops here."""

    def run_tally(self, tally: SynthesisTally) -> SynthesisTally:
        """What the whole run has synthesised, given this process's `tally` (Ray: summed over the
        workers, a collective every worker calls at each evaluated epoch)."""
        return tally


class LocalSynthesis:
    """Synthesis episodes run in this process, at the resolutions the schedule gives, against the
    student being distilled (its step count is the version the batch saw)."""

    def __init__(self, synthesizer: Synthesizer, schedule: ResolutionSchedule, distiller: Distiller) -> None:
        self.synthesizer, self.schedule, self.distiller = synthesizer, schedule, distiller
        self.epoch: int | None = None  # the last epoch synthesised for

    world = 1

    def episodes(self, epoch: int, adversarial: bool) -> Iterator[tuple[SynthesisRecord, bool]]:
        self.epoch = epoch
        self.synthesizer.maybe_rebuild(epoch)  # now, even if the loop takes no episode this epoch

        def run() -> Iterator[tuple[SynthesisRecord, bool]]:
            while True:
                resolution = self.schedule.resolution(epoch, self.synthesizer.step)
                yield self.synthesizer.episode(resolution, self.distiller.student, self.distiller.steps,
                                               adversarial=adversarial), True

        return run()

    def generator_states(self) -> list[dict[str, Any]]:
        """The synthesizer's state in the shape a generator actor saves it (see `GeneratorActor.get_state`)."""
        return [self.synthesizer.snapshot(self.epoch, index=0)]

    def load_generator_states(self, states: list[dict[str, Any]]) -> None:
        self.epoch = self.synthesizer.load_snapshot(states[0])


def build_distiller(cfg: RunConfig, info: DatasetInfo, teacher: nn.Module, embeddings: torch.Tensor,
                    device: torch.device, parallel: Callable[[nn.Module], nn.Module] | None = None) -> Distiller:
    """A fresh student and its optimizer. Seeded here, so every process (and every Ray Train rank) starts
    from the same student, whatever it did before (e.g. train the teacher)."""
    seed_everything(cfg.seed)
    student = StudentNet(cfg.student.arch, info.num_classes, info.in_chans, embeddings.shape[1])
    return Distiller(cfg, student, teacher, embeddings, info.mean, info.std, info.resolution, device, parallel)


def teacher_accuracy(meta: dict[str, Any], teacher: nn.Module, test: Dataset, cfg: RunConfig,
                     device: torch.device) -> float:
    """The teacher's test top-1: from its checkpoint's metadata, else measured now."""
    saved = meta.get("test_acc")
    if saved is not None:
        return float(saved)
    return accuracy(teacher.to(device), test, cfg.data.eval_batch_size, device)


def draw_batch(pool: SyntheticPool, cfg: RunConfig, rng: np.random.Generator) -> PoolBatch | list[PoolBatch]:
    """A KD batch: mixed resolutions when the student sees everything resized, else one resolution."""
    if cfg.resolution.student_input == "resize":
        return pool.sample_mixed(cfg.distill.batch_size, rng)
    return pool.sample(cfg.distill.batch_size, rng)


def run_epochs(cfg: RunConfig, state: RunState, source: RecordSource, distiller: Distiller, pool: SyntheticPool,
               evaluate: Callable[[nn.Module], float] | None, hooks: EpochHooks,
               stop_after_epoch: int | None = None) -> None:
    """Run from `state.epoch` to the end of the run, or stop once `stop_after_epoch` epochs (warm-up
    included) are done. `evaluate` scores the student's backbone (None where another process evaluates).
    Epochs are numbered from 1 wherever users see them (hooks, metrics, history, MLflow steps, checkpoint
    names): epoch N is the N-th, and `state.epoch` counts those done."""
    origin = time.perf_counter() - state.loop_s
    for epoch in range(state.epoch, cfg.total_epochs):
        started = time.perf_counter()
        metrics = run_epoch(cfg, epoch, state, source, distiller, pool, evaluate, hooks)
        state.epoch = epoch + 1
        state.loop_s = time.perf_counter() - origin
        metrics["epoch_s"] = time.perf_counter() - started
        stop_here = state.epoch == stop_after_epoch
        hooks.after_epoch(state.epoch, metrics, state, last=stop_here or state.epoch == cfg.total_epochs)
        if stop_here:
            return


def run_epoch(cfg: RunConfig, epoch: int, state: RunState, source: RecordSource, distiller: Distiller,
              pool: SyntheticPool, evaluate: Callable[[nn.Module], float] | None,
              hooks: EpochHooks) -> dict[str, Any]:
    """Epoch index `epoch` (0-based; reported as `epoch + 1`): synthesis, then (after warm-up) KD steps
    and an evaluation. Returns its metrics."""
    warming_up = epoch < cfg.synthesis.warmup
    synthesis_loss = synthesise(cfg, epoch, state, source, pool, warming_up, hooks)
    metrics: dict[str, Any] = {"epoch": epoch + 1, "phase": "warmup" if warming_up else "distill"}
    if not warming_up:
        hooks.before_kd(distiller)
        losses: dict[str, float] = {}
        for _ in range(cfg.distill.kd_steps):
            losses = distiller.step(draw_batch(pool, cfg, state.sample_rng))
            hooks.after_kd_step(distiller)
        metrics |= {f"loss_{k}": v for k, v in losses.items()} | {"lr": distiller.lr}
        run_tally = hooks.run_tally(state.tally)
        if evaluate is not None:
            if cfg.distill.bn_stats == "pool":
                distiller.recalibrate_bn(pool.sample_records(cfg.distill.bn_stats_images, state.sample_rng))
            metrics["student_acc"] = evaluate(distiller.student.backbone)
            state.history.append({"epoch": epoch + 1, "student_acc": metrics["student_acc"], "lr": distiller.lr,
                                  **{f"loss_{k}": v for k, v in losses.items()},
                                  "synthesis_loss": synthesis_loss, "pool": len(pool),
                                  **cumulative_spend(run_tally)})
    state.kd_steps = distiller.steps
    return metrics | {"pool": len(pool), "kd_steps": distiller.steps, "episodes": state.episodes}


def synthesise(cfg: RunConfig, epoch: int, state: RunState, source: RecordSource, pool: SyntheticPool,
               warming_up: bool, hooks: EpochHooks) -> dict[str, float]:
    """This process's episodes of `epoch`: `gwp_loops` in warm-up, then `g_loops` per epoch or, with a
    synthesis budget, until this epoch's share of it is spent. Every episode counts in the tally (what was
    spent); those the source admits enter the pool. Returns the last episode's losses."""
    records = source.episodes(epoch, adversarial=not warming_up)
    kind = cfg.budget.kind
    count: float | None = episodes_of_epoch(cfg, epoch, source.world)
    target = math.inf
    if count is None:
        # The rest of this process's budget, spread evenly over the distillation epochs left.
        remaining_epochs = cfg.total_epochs - epoch
        spent = spend(state.tally, kind)
        target, count = spent + (cfg.budget.amount / source.world - spent) / remaining_epochs, math.inf
    synthesis_loss: dict[str, float] = {}
    taken = 0
    while taken < count and spend(state.tally, kind) < target:
        record, admitted = next(records)
        taken += 1
        state.episodes += 1
        state.tally.add(record)
        synthesis_loss = record.losses
        if admitted:
            pool.add(record)
        hooks.after_episode(state, pool)
    return synthesis_loss


def episodes_of_epoch(cfg: RunConfig, epoch: int, world: int) -> int | None:
    """Episodes each of `world` processes takes in epoch index `epoch`; None where a synthesis budget
    decides (the count then depends on what the episodes spent)."""
    if epoch < cfg.synthesis.warmup:
        return math.ceil(cfg.synthesis.gwp_loops / world)
    if cfg.budget.kind == "epochs":
        return math.ceil(cfg.synthesis.g_loops / world)
    return None


def episodes_to_take(cfg: RunConfig, from_epoch: int, to_epoch: int, world: int) -> int | None:
    """Episodes each of `world` processes takes over epoch indices [from_epoch, to_epoch); None where a
    synthesis budget decides any of them."""
    counts = [episodes_of_epoch(cfg, epoch, world) for epoch in range(from_epoch, to_epoch)]
    return None if None in counts else sum(counts)


def spend(tally: SynthesisTally, kind: str) -> float:
    """What a tally has spent in budget units (`epochs` budgets count nothing here)."""
    return {"images": sum(tally.images.values()), "pixels": sum(tally.pixels.values()),
            "seconds": tally.seconds}.get(kind, 0.0)


def cumulative_spend(tally: SynthesisTally) -> dict[str, float]:
    """A history entry's synthesis so far: images, pixels and synthesis seconds."""
    return {"images": sum(tally.images.values()), "pixels": sum(tally.pixels.values()),
            "synthesis_s": tally.seconds}
