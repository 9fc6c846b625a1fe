"""The single-process runner: build every part in one sequence, then run the shared epochs
(`muse.loop.run_epochs`) with synthesis in this process. Checkpoints, `resume_from` and
`stop_after_epoch` mean what they mean on Ray (`orchestration/`): the same checkpoint format
(`muse.checkpoint`), the same summary and outputs (`muse.outputs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from muse.checkpoint import commit_local_checkpoint, latest_checkpoint, prepare_output_dir, restore, write_checkpoint
from muse.config import ConfigError, RunConfig
from muse.data import ImageSplits, load_dataset
from muse.distillation import Distiller
from muse.embeddings import label_embeddings
from muse.evaluate import LARGE_TEST_SPLIT, topk_accuracy
from muse.loop import EpochHooks, LocalSynthesis, RunState, build_distiller, run_epochs, teacher_accuracy
from muse.errors import RunInterrupted
from muse.outputs import build_summary, save_outputs
from muse.pool import SyntheticPool
from muse.runtime import resolve_device
from muse.schedules import ResolutionSchedule
from muse.student import StudentNet
from muse.synthesis import Synthesizer, applicable_key_region
from muse.teacher import ensure_teacher
from muse.tracking import Tracker, check_store, epoch_metrics, finish_tracking, run_tracker


@dataclass
class RunParts:
    """Everything a single-process run is made of, built once by `build_run`."""

    cfg: RunConfig
    device: torch.device
    splits: ImageSplits
    teacher: torch.nn.Module
    teacher_meta: dict[str, Any]
    embeddings: torch.Tensor
    distiller: Distiller
    synthesizer: Synthesizer
    pool: SyntheticPool
    schedule: ResolutionSchedule

    @property
    def student(self) -> StudentNet:
        return self.distiller.student


def build_run(cfg: RunConfig, splits: ImageSplits | None = None) -> RunParts:
    device = resolve_device(cfg.device)
    splits = splits or load_dataset(cfg.data)
    info = splits.info
    teacher, meta = ensure_teacher(cfg, splits, device)
    teacher.to(device)
    cfg = applicable_key_region(cfg, teacher, info.in_chans, info.resolution)
    embeddings = label_embeddings(cfg.embedding, teacher, info.num_classes, cfg.seed)
    distiller = build_distiller(cfg, info, teacher, embeddings, device)
    synthesizer = Synthesizer(cfg, teacher, embeddings, info.in_chans, info.mean, info.std, info.resolution, device)
    return RunParts(cfg, device, splits, teacher, meta, embeddings, distiller, synthesizer,
                    SyntheticPool(cfg.pool.capacity), ResolutionSchedule(cfg.resolution, cfg.total_epochs, cfg.seed))


def run_distillation(cfg: RunConfig, splits: ImageSplits | None = None, progress: bool = True, *,
                     resume_from: Path | None = None, stop_after_epoch: int | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Run (or, with `resume_from`, continue) warm-up and epochs in this process, through
    `stop_after_epoch` when given; write the student, the pool and `summary.json` to `cfg.output_dir`
    (which must not hold another run, unless `overwrite` deletes it)."""
    started = time.perf_counter()
    prepare_output_dir(cfg.output_dir, fresh=resume_from is None, overwrite=overwrite)
    check_store(cfg)  # an unreachable tracking server fails here, before the teacher is trained
    parts = build_run(cfg, splits)
    cfg = parts.cfg  # as the teacher allows (see `applicable_key_region`)
    source = LocalSynthesis(parts.synthesizer, parts.schedule, parts.distiller)
    if resume_from is not None:
        state, saved, _ = restore(resume_from, 0, parts.distiller, parts.pool)
        source.load_generator_states(saved.generators)
        teacher_acc = saved.teacher_acc
    else:
        state = RunState.fresh(cfg.seed)
        teacher_acc = teacher_accuracy(parts.teacher_meta, parts.teacher, parts.splits.test, cfg, parts.device)
    tracker = run_tracker(cfg, state.history)  # a resumed run's MLflow run starts with the epochs before it
    try:
        hooks = EngineHooks(parts, source, tracker, teacher_acc, state, progress)
        interrupted = False
        try:
            run_epochs(cfg, state, source, parts.distiller, parts.pool, hooks.evaluate, hooks, stop_after_epoch)
        except KeyboardInterrupt:  # Ctrl+C: keep the student so far; the committed checkpoints stay as they are
            interrupted = True
        finally:
            hooks.close()
        summary = build_summary(cfg, teacher_acc=teacher_acc, history=state.history, tally=state.tally,
                                wall_s=time.perf_counter() - started, loop_s=state.loop_s, kd_steps=state.kd_steps,
                                episodes=state.episodes, epochs_done=state.epoch)
        if interrupted:
            summary["interrupted"] = {"after_epoch": state.epoch, "resume_from": _latest_checkpoint_name(cfg)}
        parts.pool.save(cfg.pool_directory)
        save_outputs(cfg, summary, parts.student.state_dict(), parts.splits.info)
    except BaseException as error:
        tracker.finish([], status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if interrupted:
        finish_tracking(tracker, cfg, summary, step=state.epoch, status="KILLED")
        raise RunInterrupted(summary)
    finish_tracking(tracker, cfg, summary, step=state.epoch)
    return summary


def _latest_checkpoint_name(cfg: RunConfig) -> str | None:
    try:
        return latest_checkpoint(cfg.output_dir).name
    except ConfigError:  # stopped before its first checkpoint
        return None


class EngineHooks(EpochHooks):
    """The single process evaluates every epoch, shows progress, logs each evaluation and commits a
    checkpoint every `checkpoint_every` epochs and at the last (or stop) epoch."""

    def __init__(self, parts: RunParts, source: LocalSynthesis, tracker: Tracker, teacher_acc: float,
                 state: RunState, progress: bool) -> None:
        self.parts, self.source, self.tracker, self.teacher_acc = parts, source, tracker, teacher_acc
        cfg = parts.cfg
        self.bar = tqdm(total=cfg.total_epochs, initial=state.epoch, desc=f"{cfg.method} distill", unit="epoch",
                        disable=not progress, dynamic_ncols=True)

    def evaluate(self, model: torch.nn.Module) -> float:
        p = self.parts
        return topk_accuracy(model, p.splits.test, (1,), p.cfg.data.eval_batch_size, p.device,
                             progress=not self.bar.disable and len(p.splits.test) >= LARGE_TEST_SPLIT)[1]

    def after_episode(self, state: RunState, pool: SyntheticPool) -> None:
        # Warm-up epochs and budgeted epochs can take minutes: show each episode as it lands.
        self.bar.set_postfix(phase="synthesis", episodes=state.episodes, pool=len(pool))

    def after_epoch(self, epoch: int, metrics: dict[str, Any], state: RunState, last: bool) -> None:
        p, cfg = self.parts, self.parts.cfg
        self.bar.update(1)
        if "student_acc" in metrics:
            self.bar.set_postfix(acc=f"{metrics['student_acc']:.2f}",
                                 best=f"{max(h['student_acc'] for h in state.history):.2f}")
            self.tracker.log_epoch(epoch, epoch_metrics(state.history[-1], state.tally))
            self.tracker.log_visuals(epoch, p.pool.latest_by_resolution(), p.teacher, p.splits.info,
                                     cfg.resolution.teacher_input)
        else:
            self.bar.set_postfix(phase="warm-up", pool=metrics["pool"])
        if last or state.epoch % cfg.checkpoint_every == 0:
            commit_local_checkpoint(cfg.output_dir, state.epoch, lambda folder: write_checkpoint(
                folder, 0, cfg, state, p.distiller, p.pool, source_state={}, generators=self.source.generator_states(),
                teacher_acc=self.teacher_acc))

    def close(self) -> None:
        self.bar.close()
