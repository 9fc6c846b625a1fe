"""One Tune trial: a full orchestrated run (generator actors + a Ray Train TorchTrainer) of the base
config with the trial's sampled fields, logged to an MLflow child run of the sweep's parent run.

ASHA / FIFO trials fit one TorchTrainer whose evaluations reach Tune through the Train → Tune report
callback. PBT trials fit one TorchTrainer too, which commits a checkpoint every `perturbation_interval`
epochs after the warm-up (a segment boundary); a Train callback hands each to this process, which
reports it to Tune while the run goes on. When PBT exploits, Tune ends the trial and restarts it with
a mutated config and the donor's checkpoint, which a new Train run (a new segment folder) resumes from.

A sweep continued with --resume restarts its unfinished trials: a PBT trial from the checkpoint it last
reported to Tune, any other from the newest Train checkpoint in its folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.util.queue import Empty, Queue

from muse.checkpoint import latest_checkpoint, read_ranks, read_saved_run
from muse.config import ConfigError, RunConfig, validate_config, with_overrides
from muse.data import load_dataset
from muse.tracking import Tracker, child_tracker, finish_tracking
from orchestration.runner import run, summarize
from orchestration.threads import start_thread
from sweeps.train_callbacks import BoundaryCheckpointCallback, EvaluationReportCallback

TRIAL_TAG = "muse.trial_id"
SEGMENT_LOG = "segments.jsonl"  # one line per Train run of a trial: where it started and from what


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The Tune function trainable. `params`: the sampled dotted fields; `sweep`: base (RunConfig JSON),
    root (the sweep folder), metric, parent_run_id, pbt_interval (None unless PBT), name."""
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    trial_root = Path(sweep["root"]) / "trials" / trial_name
    cfg = with_overrides(validate_config(sweep["base"]), params | {"output_dir": str(next_segment(trial_root))})
    tracker = trial_tracker(cfg, trial_id, trial_name, sweep["parent_run_id"], sweep["name"])
    metric = sweep["metric"]
    # No FAILED on an exception here: a trial the scheduler stops can raise on its way out too. The
    # driver closes every run left open, as FAILED or KILLED from what Tune says of the trial.
    if sweep["pbt_interval"]:
        checkpoint = tune.get_checkpoint()  # the donor's after an exploit, else None
        clock = SegmentClock(checkpoint)
        cfg, summary = _train_in_segments(cfg, params, trial_root, tracker, metric, sweep["pbt_interval"], clock,
                                          checkpoint)
    else:
        cfg, summary = _train_to_the_end(cfg, params, trial_root, tracker, metric)
    finish_tracking(tracker, cfg, summary, step=summary["epochs_done"])
    if sweep["pbt_interval"]:
        tune.report(_result(summary, metric) | clock.lap(summary["loop_s"]),
                    checkpoint=tune.Checkpoint.from_directory(summary["checkpoint"]))
    else:
        tune.report(_result(summary, metric))


def _train_to_the_end(cfg: RunConfig, params: dict[str, Any], trial_root: Path, tracker: Tracker,
                      metric: str) -> tuple[RunConfig, dict[str, Any]]:
    """One Train run to the last epoch, reporting each evaluation to Tune; it continues from the newest
    checkpoint of the trial's earlier segments when a resumed sweep restarts the trial."""
    checkpoint = _latest_trial_checkpoint(trial_root)
    epoch = _epoch_of(checkpoint)
    _log_segment(trial_root, tracker, cfg, params, start_epoch=epoch, resumed_from=checkpoint.path if checkpoint else None)
    if epoch >= cfg.total_epochs:  # interrupted after its last checkpoint, before its last report
        return cfg, summarize(cfg, checkpoint, 0.0, load_dataset(cfg.data).info)
    callback = EvaluationReportCallback(metric, cfg.synthesis.warmup, last_epoch=cfg.total_epochs)
    return cfg, run(cfg, checkpoint, tracker=tracker, callbacks=[callback])


def _latest_trial_checkpoint(trial_root: Path) -> ray.train.Checkpoint | None:
    """The newest checkpoint of the trial's newest segment that has one (None for a new trial)."""
    for segment in sorted(trial_root.glob("segment-*"), reverse=True):
        try:
            return ray.train.Checkpoint.from_directory(str(latest_checkpoint(segment)))
        except ConfigError:  # stopped before its first checkpoint
            continue
    return None


def _epoch_of(checkpoint: ray.train.Checkpoint | None) -> int:
    """The epoch a run continues at from `checkpoint` (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return read_saved_run(Path(directory)).epoch


def _train_in_segments(cfg: RunConfig, params: dict[str, Any], trial_root: Path, tracker: Tracker,
                       metric: str, interval: int, clock: SegmentClock,
                       checkpoint: ray.train.Checkpoint | None) -> tuple[RunConfig, dict[str, Any]]:
    """One Train run to the end that commits a checkpoint at each segment boundary (every `interval`
    epochs after the warm-up); each boundary goes to Tune with that checkpoint while the run goes on.
    A trial PBT leaves alone never stops; one that clones another is ended by Tune with its process,
    and restarts here, in a new segment folder, from the donor's checkpoint (`checkpoint`) with the
    mutated config."""
    epoch = _epoch_of(checkpoint)
    total = cfg.total_epochs
    if epoch >= total:  # cloned a donor that had already finished: its outputs are this trial's
        return cfg, summarize(cfg, checkpoint, 0.0, load_dataset(cfg.data).info)
    _log_segment(trial_root, tracker, cfg, params, epoch, checkpoint.path if checkpoint else None)
    boundaries = segment_boundaries(epoch, cfg.synthesis.warmup, interval, total)
    boundary_reports = Queue(actor_options={"num_cpus": 0})  # the Train controller → this thread
    callback = BoundaryCheckpointCallback(boundary_reports, boundaries)
    fitting, outcome = start_thread("muse-trial-run", lambda: run(cfg, checkpoint, tracker=tracker, callbacks=[callback],
                                                                   checkpoint_epochs=boundaries))
    resumed_from = checkpoint.path if checkpoint else ""
    while fitting.is_alive() or not boundary_reports.empty():
        try:
            reported = boundary_reports.get(timeout=0.5)
        except Empty:
            continue
        result = _boundary_result(reported["metrics"], metric, cfg.synthesis.warmup)
        tune.report(result | clock.lap(result["loop_s"]) | {"resumed_from": resumed_from},
                    checkpoint=tune.Checkpoint.from_directory(reported["checkpoint"]))
        resumed_from = ""
    fitting.join()
    if "error" in outcome:
        raise outcome["error"]
    return cfg, outcome["result"]


def segment_boundaries(start_epoch: int, warmup: int, interval: int, total: int) -> list[int]:
    """The epochs after `start_epoch` at which a PBT trial reports to Tune: every `interval` epochs
    counted from the end of the warm-up (which joins the first segment), before the last epoch (the
    trial reports that one itself, with its outputs)."""
    return [e for e in range(warmup + interval, total, interval) if e > start_epoch]


class SegmentClock:
    """Each PBT segment's wall seconds in this trial process, from its start or its previous report,
    beside the seconds its epochs took (`loop_s`, cumulative over a run and kept in its checkpoints).
    The difference is what a segment costs besides training: Train runs and actors started, reports,
    outputs (`benchmarks/pbt_segments.py` reads both from Tune's results)."""

    def __init__(self, checkpoint: ray.train.Checkpoint | None) -> None:
        self.started = time.monotonic()
        self.loop_s = 0.0
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.loop_s = read_ranks(Path(directory))[0]["loop_s"]

    def lap(self, loop_s: float) -> dict[str, float]:
        now = time.monotonic()
        lap = {"segment_wall_s": now - self.started, "segment_loop_s": loop_s - self.loop_s}
        self.started, self.loop_s = now, loop_s
        return lap


def _boundary_result(metrics: dict[str, Any], metric: str, warmup: int) -> dict[str, Any]:
    """What Tune sees of a boundary: the epoch's numbers, like the last result of a segment."""
    return _numbers(metrics, metric) | {"epochs_done": metrics["epoch"], "evaluations": metrics["epoch"] - warmup}


def _result(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """What Tune sees of a finished (segment of a) run: its last evaluation, like the callback's results."""
    last = summary["history"][-1] if summary["history"] else {}
    return _numbers(last, metric) | {"epochs_done": summary["epochs_done"], "evaluations": len(summary["history"])}


def _numbers(evaluation: dict[str, Any], metric: str) -> dict[str, Any]:
    """The numeric fields of one evaluation, which must hold the sweep's metric."""
    if metric not in evaluation:
        raise ValueError(f"the sweep metric {metric!r} is not in the run's evaluations ({sorted(evaluation)}); "
                         "use student_acc or a logged loss such as loss_kd")
    return {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def next_segment(trial_root: Path) -> Path:
    """A fresh output folder for the trial's next Train run (Ray Train would resume a reused one)."""
    return trial_root / f"segment-{len(list(trial_root.glob('segment-*'))):02d}"


def _log_segment(trial_root: Path, tracker: Tracker, cfg: RunConfig, params: dict[str, Any],
                 start_epoch: int, resumed_from: str | None) -> None:
    entry = {"segment": cfg.output_dir.name, "start_epoch": start_epoch, "resumed_from": resumed_from,
             "params": params}
    trial_root.mkdir(parents=True, exist_ok=True)
    with (trial_root / SEGMENT_LOG).open("a") as log:
        log.write(json.dumps(entry) + "\n")
    tracker.set_tags({f"segment.{cfg.output_dir.name}": json.dumps(entry)[:5000]})


def trial_tracker(cfg: RunConfig, trial_id: str, trial_name: str, parent_run_id: str | None,
                  sweep_name: str) -> Tracker:
    """The trial's MLflow child run: found again by its trial id when PBT restarts the trial, else new."""
    return child_tracker(cfg, parent_run_id, (TRIAL_TAG, trial_id), run_name=trial_name,
                         tags={"muse.sweep": sweep_name})
