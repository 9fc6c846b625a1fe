"""One Tune trial: a full orchestrated run (generator actors + a Ray Train TorchTrainer) of the base
config with the trial's sampled fields, logged to an MLflow child run of the sweep's parent run.

ASHA / FIFO trials fit one TorchTrainer whose evaluations reach Tune through the Train → Tune report
callback. PBT trials train in segments of `perturbation_interval` epochs, each a new Train run that
resumes from the previous segment's checkpoint and reports it to Tune. When PBT exploits, Tune restarts
the trial with a mutated config and the donor's checkpoint, which the next segment resumes from.

A sweep continued with --resume restarts its unfinished trials: a PBT trial from the checkpoint it last
reported to Tune, any other from the newest Train checkpoint in its folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from muse.checkpoint import latest_checkpoint, read_saved_run
from muse.config import ConfigError, RunConfig, validate_config, with_overrides
from muse.data import load_dataset
from muse.tracking import Tracker, child_tracker, finish_tracking
from orchestration.runner import run, summarize

TRIAL_TAG = "muse.trial_id"
SEGMENT_LOG = "segments.jsonl"  # one line per Train run of a trial: where it started and from what


class EvaluationReportCallback(TuneReportCallback):
    """Forwards each evaluated epoch's rank-0 metrics to Tune, with its count of `evaluations`, except
    the last: the trial reports that itself once its outputs are written, since Tune may end a trial's
    process at any report. Warm-up epochs have no accuracy yet, and Tune rejects a result without the
    sweep's metric."""

    def __init__(self, metric: str, warmup: int, last_epoch: int) -> None:
        super().__init__()
        self.metric, self.warmup, self.last_epoch = metric, warmup, last_epoch

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.metric in metrics[0] and metrics[0]["epoch"] < self.last_epoch:  # epochs count from 1
            evaluations = metrics[0]["epoch"] - self.warmup
            super().after_report(run_context, [metrics[0] | {"evaluations": evaluations}, *metrics[1:]], checkpoint)


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
        cfg, summary = _train_in_segments(cfg, params, trial_root, tracker, metric, sweep["pbt_interval"])
    else:
        cfg, summary = _train_to_the_end(cfg, params, trial_root, tracker, metric)
    finish_tracking(tracker, cfg, summary, step=summary["epochs_done"])
    checkpoint = tune.Checkpoint.from_directory(summary["checkpoint"]) if sweep["pbt_interval"] else None
    tune.report(_result(summary, metric), checkpoint=checkpoint)


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
                       metric: str, interval: int) -> tuple[RunConfig, dict[str, Any]]:
    """Train to the end in segments, reporting each but the last to Tune with its checkpoint."""
    checkpoint = tune.get_checkpoint()  # the donor's after an exploit, else None
    epoch = _epoch_of(checkpoint)
    total = cfg.total_epochs
    resumed_from = checkpoint.path if checkpoint else None
    if epoch >= total:  # cloned a donor that had already finished: its outputs are this trial's
        return cfg, summarize(cfg, checkpoint, 0.0, load_dataset(cfg.data).info)
    while True:
        stop_after = min(max(epoch, cfg.synthesis.warmup) + interval, total)  # warm-up joins the first segment
        _log_segment(trial_root, tracker, cfg, params, epoch, resumed_from)
        summary = run(cfg, checkpoint, stop_after_epoch=stop_after, tracker=tracker)
        epoch = summary["epochs_done"]
        if epoch >= total:
            return cfg, summary
        tune.report(_result(summary, metric) | {"resumed_from": resumed_from or ""},
                    checkpoint=tune.Checkpoint.from_directory(summary["checkpoint"]))
        checkpoint = ray.train.Checkpoint.from_directory(summary["checkpoint"])
        resumed_from = summary["checkpoint"]
        cfg = cfg.model_copy(update={"output_dir": next_segment(trial_root)})


def _result(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """What Tune sees of a finished (segment of a) run: its last evaluation, like the callback's results."""
    last = summary["history"][-1] if summary["history"] else {}
    if metric not in last:
        raise ValueError(f"the sweep metric {metric!r} is not in the run's evaluations ({sorted(last)}); "
                         "use student_acc or a logged loss such as loss_kd")
    return ({k: v for k, v in last.items() if isinstance(v, (int, float))}
            | {"epochs_done": summary["epochs_done"], "evaluations": len(summary["history"])})


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
