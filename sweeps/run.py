"""Run a named sweep with Ray Tune: every trial is a full orchestrated MUSE run (generator actors +
Ray Train workers), logged to MLflow as a child run of the sweep's parent run.

    python sweeps/run.py sweeps/loss_weights.yaml                    # ASHA + Optuna over loss weights
    python sweeps/run.py sweeps/resolution_pbt.yaml --num-cpus 2     # PBT over resolution schedules
    python sweeps/run.py sweeps/kr_schedules.yaml distill.epochs=10  # overrides apply to every trial
    ray job submit --working-dir . -- python sweeps/run.py sweeps/loss_weights.yaml
    python sweeps/run.py sweeps/loss_weights.yaml --resume           # continue an interrupted sweep

Results land in the sweep's folder (default runs/sweeps/<name>): `results.csv`, `best_config.yaml` (a
runnable config: `muse distill --config <it>` or `python orchestration/run.py --config <it>`), the Tune
experiment under `tune/`, each trial's run under `trials/<trial>/segment-NN/`, and `mlflow.db`.
A sweep stopped by Ctrl+C (or a lost driver) continues with the same command plus `--resume`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from muse.commandline import add_tracking_flags, tracking_overrides
from muse.config import ConfigError, RunConfig, with_overrides
from muse.data import DatasetError, load_dataset
from muse.io import atomic_write
from muse.runtime import resolve_device
from muse.teacher import ensure_teacher
from muse.tracking import Tracker, create_tracker, reopen_tracker, ui_hint
from orchestration.cluster import connect
from sweeps.spec import SweepSpec, load_sweep
from sweeps.trial import run_trial

TUNE_DIR = "tune"
SWEEP_STATE = "sweep_state.json"  # what --resume needs: the parent run, and the spec and config to match


@dataclass
class TrialRow:
    trial: str
    status: str  # done | stopped (by the scheduler) | error | unfinished (the sweep was interrupted)
    params: dict[str, Any]
    final: float | None
    best: float | None
    # Points in `history`: every evaluated epoch of a finished trial (from its summary), else the results
    # Tune kept (one per evaluation; one per segment for PBT).
    evaluations: int
    history: list[dict[str, Any]]


@dataclass
class SweepOutcome:
    directory: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    concurrency: int
    parent_run_id: str | None
    interrupted: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep definition (YAML), e.g. sweeps/loss_weights.yaml")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--num-samples", type=int, help="override the sweep's num_samples")
    parser.add_argument("--max-concurrent-trials", type=int, help="override the sweep's max_concurrent_trials")
    parser.add_argument("--output-dir", type=Path, help="override the sweep's output_dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep interrupted in its folder (same sweep file, flags and overrides): "
                             "finished trials are kept, the others go on from their latest checkpoint")
    add_tracking_flags(parser)
    parser.add_argument("overrides", nargs="*", help="dotted run-config overrides for every trial")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_cluster = False
    try:
        spec, base = load_sweep(args.sweep, [*tracking_overrides(args), *args.overrides])
        updates = {"num_samples": args.num_samples, "max_concurrent_trials": args.max_concurrent_trials,
                   "output_dir": args.output_dir}
        spec = SweepSpec.model_validate(spec.model_dump() | {k: v for k, v in updates.items() if v is not None})
        started_cluster = connect(base, args.num_cpus)
        outcome = run_sweep(spec, base, resume=args.resume)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        print(f"error: the sweep failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if started_cluster:
            ray.shutdown()
    print(format_table(spec, outcome.rows))
    print(f"trials: {len(outcome.rows)}, at most {outcome.concurrency} at a time")
    print(f"results: {outcome.directory / 'results.csv'}")
    if outcome.interrupted:
        unfinished = sum(r.status == "unfinished" for r in outcome.rows)
        print(f"interrupted with {unfinished} trial(s) unfinished (and {spec.trial_count - len(outcome.rows)} not "
              "started); continue with the same command plus --resume", file=sys.stderr)
        return 130
    if outcome.best_config:
        print(f"best: {outcome.best.trial} → {outcome.best_config}")
    if hint := ui_hint(base, outcome.directory):
        print(hint)
    return 0 if outcome.best else 1


def run_sweep(spec: SweepSpec, base: RunConfig, resume: bool = False) -> SweepOutcome:
    """Run the sweep on the connected Ray cluster (or, with `resume`, continue the one interrupted in
    its folder); write results.csv and best_config.yaml."""
    root = spec.directory
    user_base = base
    base = _trial_base(base, root, spec.name)
    parent_run_id = _resumable(spec, base, root) if resume else None
    if not resume and (root / TUNE_DIR).exists():
        raise ConfigError(f"sweep folder {str(root)!r} holds an earlier sweep; continue it with --resume, give "
                          "--output-dir (or output_dir in the sweep file) a new folder, or remove the old one")
    ensure_teacher(base, load_dataset(base.data), resolve_device("cpu" if base.device == "auto" else base.device))
    demand, bundles = trial_resources(spec, base)
    concurrency = concurrent_trials(spec.max_concurrent_trials, demand, ray.cluster_resources())
    parent_cfg = base.model_copy(update={"output_dir": root})
    parent = (reopen_tracker(parent_cfg, parent_run_id) if parent_run_id is not None
              else create_tracker(parent_cfg, run_name=spec.name, tags={"muse.sweep": spec.name}))
    rows: list[TrialRow] = []
    try:
        if not resume:
            parent.log_params(_sweep_params(spec, concurrency))
        _write_state(root, parent.run_id, spec, base)
        payload = {"base": base.model_dump(mode="json"), "root": str(root), "metric": spec.metric, "name": spec.name,
                   "parent_run_id": parent.run_id,
                   "pbt_interval": spec.scheduler.perturbation_interval if spec.scheduler.kind == "pbt" else None}
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=payload),
                                        tune.PlacementGroupFactory(bundles))
        random.seed(spec.scheduler.seed)  # PBT explores with Python's random module in this process
        # Restored: the trials, their results and checkpoints, and the searcher's state. Not the
        # scheduler's: Tune rebuilds it as it was before the first trial (ASHA's rungs start empty).
        tuner = tune.Tuner.restore(str(root / TUNE_DIR), trainable, resume_unfinished=True,
                                   resume_errored=True) if resume else tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        search_alg=_search(spec, concurrency), scheduler=_scheduler(spec, base),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            # A trial's last result (the only one with `epochs_done` at the end) stops it before any
            # scheduler sees it: PBT must not clone a finished trial into one that reports it again.
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(root), verbose=1,
                                      stop=_Finished(base.total_epochs)),
        )
        grid = tuner.fit()
        rows = [_row(result, spec, base) for result in grid]
        # Ctrl+C: Tune stops the trials, saves the experiment and returns what it has, every trial it ended
        # counted as terminated. Tune marks the last result `done` when a trial finished or a scheduler or
        # stopper stopped it; the trials without it were cut off.
        cut_off = [result.error is None and not result.metrics.get("done") for result in grid]
        if any(cut_off) or len(grid) < spec.trial_count:
            rows = [replace(r, status="unfinished") if cut and r.status == "stopped" else r
                    for r, cut in zip(rows, cut_off)]
            _write_results(rows, spec, root)
            parent.finish([root / "results.csv"], status="KILLED")
            return SweepOutcome(root, rows, None, None, concurrency, parent.run_id, interrupted=True)
        best = _best(rows, spec.mode)
        best_config = _write_best_config(user_base, best, spec, root) if best else None
        _write_results(rows, spec, root)
        _finish_parent(parent, spec, rows, best, root, best_config)
    except BaseException:
        parent.finish([], status="FAILED")
        raise
    finally:
        _close_trial_runs(parent, rows)  # whatever happened, no trial run is left RUNNING
    return SweepOutcome(root, rows, best, best_config, concurrency, parent.run_id)


def _write_state(root: Path, parent_run_id: str | None, spec: SweepSpec, base: RunConfig) -> None:
    state = {"parent_run_id": parent_run_id, "spec": spec.model_dump(mode="json"), "base": base.model_dump(mode="json")}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / SWEEP_STATE, lambda tmp: tmp.write_text(json.dumps(state, indent=1)))


def _resumable(spec: SweepSpec, base: RunConfig, root: Path) -> str | None:
    """The parent run id of the sweep interrupted in `root`, after checking it is the same sweep."""
    state_file = root / SWEEP_STATE
    # Tune writes tuner.pkl at once, its experiment state only once trials have started.
    saved_experiment = any((root / TUNE_DIR).glob("experiment_state-*.json"))
    if not state_file.is_file() or not saved_experiment or not tune.Tuner.can_restore(str(root / TUNE_DIR)):
        raise ConfigError(f"--resume: no interrupted sweep in {str(root)!r} (or it stopped before any trial "
                          "started: remove the folder and start again); start it without --resume, or give the "
                          "folder it ran in with --output-dir")
    saved = json.loads(state_file.read_text())
    now = json.loads(json.dumps({"spec": spec.model_dump(mode="json"), "base": base.model_dump(mode="json")}))
    changed = [what for key, what in (("spec", "sweep file"), ("base", "run config")) if saved[key] != now[key]]
    if changed:
        raise ConfigError(f"--resume: the {' and the '.join(changed)} differ from those of the sweep in "
                          f"{str(root)!r} ({state_file}); resume with the same sweep file, flags and overrides")
    return saved["parent_run_id"]


def _trial_base(base: RunConfig, root: Path, name: str) -> RunConfig:
    """The base config every trial starts from: the teacher pinned to one file trained once before the
    trials (its default path follows output_dir, which moves), and tracking into the sweep's store.
    Paths are absolute already (RunConfig makes them so), as trials run in other directories."""
    values: dict[str, Any] = {"output_dir": str(root / "trials"), "teacher.checkpoint": str(base.teacher_checkpoint),
                              "tracking.experiment": name}
    if base.tracking.uri is None:
        values["tracking.uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return with_overrides(base, values)


class _Finished(tune.stopper.Stopper):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return result.get("epochs_done", 0) >= self.epochs

    def stop_all(self) -> bool:
        return False


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trial_resources(spec: SweepSpec, cfg: RunConfig) -> tuple[dict[str, float], list[dict[str, float]]]:
    """What one trial holds while it runs, and the bundles of its placement group.

    The trial's placement group holds its driver (the Tune function) and its generator actors, which
    Ray places in that group as children of the trial. Ray Train V2 reserves the Train workers in a
    placement group of its own when the trial fits its TorchTrainer, so they are not in the bundles;
    they count in `demand`, which caps how many trials run at once, so that every started trial can
    also start its workers (no deadlock)."""
    g, t = cfg.ray.generators, cfg.ray.train
    generator = {"CPU": g.num_cpus, **({"GPU": g.num_gpus} if g.num_gpus else {}), **g.resources}
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {}), **t.resources}
    generator = {name: amount for name, amount in generator.items() if amount > 0}  # Ray rejects empty bundles
    bundles = [{"CPU": spec.driver_cpus}] + ([generator] * g.count if generator else [])
    demand: dict[str, float] = {}
    for bundle in [*bundles, *[worker] * max(t.count, 1)]:
        for name, amount in bundle.items():
            demand[name] = demand.get(name, 0.0) + amount
    return demand, bundles


def concurrent_trials(requested: int, demand: dict[str, float], available: dict[str, float]) -> int:
    """How many trials run at once: as requested, capped by how many whole trials the cluster holds."""
    fits = min(int(available.get(name, 0.0) / amount + 1e-9) for name, amount in demand.items() if amount > 0)
    if fits < 1:
        raise ConfigError(f"one trial needs {demand} (driver, generators and Train workers) but the cluster has "
                          f"{ {k: available.get(k, 0) for k in demand} }; lower ray.generators.num_cpus / "
                          "ray.train.cpus_per_worker or add resources")
    if fits < requested:
        print(f"note: max_concurrent_trials={requested}, but the cluster holds {fits} trial(s) of {demand} at once; "
              f"running {fits}")
    return min(requested, fits)


def _search(spec: SweepSpec, concurrency: int) -> Any:
    # Tune's max_concurrent_trials is ignored (with a warning) for a BasicVariantGenerator instance:
    # each search algorithm gets the limit itself.
    if spec.search.algorithm == "optuna":
        return ConcurrencyLimiter(OptunaSearch(seed=spec.search.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=concurrency)


def _scheduler(spec: SweepSpec, cfg: RunConfig) -> Any:
    s = spec.scheduler
    if s.kind == "asha":
        # Counted in evaluations, a metric of each result: a trial continued by --resume goes on from its
        # checkpoint's count, where Tune's training_iteration would start again at 1.
        return ASHAScheduler(time_attr="evaluations", max_t=cfg.distill.epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.kind == "pbt":
        # One result per segment of `perturbation_interval` epochs, each with a checkpoint to clone.
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                       hyperparam_mutations=spec.pbt_mutations(),
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch,
                                       custom_explore_fn=spec.clip_to_space)
    return FIFOScheduler()


def _row(result: Any, spec: SweepSpec, cfg: RunConfig) -> TrialRow:
    frame = result.metrics_dataframe
    reported = []
    if frame is not None and spec.metric in frame:
        frame = frame.dropna(subset=[spec.metric])
        # A trial continued by --resume reports the epochs after its checkpoint again: keep the last of each.
        by_epoch = {int(e): float(v) for e, v in zip(frame["epoch"], frame[spec.metric])}
        reported = [{"epoch": e, spec.metric: v} for e, v in sorted(by_epoch.items())]
    name = Path(result.path).name
    finished = bool(reported) and reported[-1]["epoch"] >= cfg.total_epochs  # epochs count from 1
    # Tune keeps the results that reached it; a trial continued by --resume lost those in flight at
    # the stop. A finished trial's summary holds every evaluation of its final model.
    history = (_summary_history(cfg.output_dir / name, spec.metric) if finished else None) or reported
    values = [h[spec.metric] for h in history]
    status = "error" if result.error else ("done" if finished else "stopped")
    pick = max if spec.mode == "max" else min
    return TrialRow(name, status, {k: result.config[k] for k in spec.space},
                    values[-1] if values else None, pick(values) if values else None, len(history), history)


def _summary_history(trial_root: Path, metric: str) -> list[dict[str, Any]] | None:
    summaries = sorted(trial_root.glob("segment-*/summary.json"))
    if not summaries:
        return None
    history = json.loads(summaries[-1].read_text())["history"]
    return [{"epoch": h["epoch"], metric: h[metric]} for h in history if metric in h]


def _best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best final value among those that did not fail; final, not best-over-epochs,
    because the best epoch is picked on the same test split it is scored on."""
    scored = [r for r in rows if r.final is not None and r.status != "error"]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.final)


def _write_best_config(user_base: RunConfig, best: TrialRow, spec: SweepSpec, root: Path) -> Path:
    # The rerun lands beside the sweep's folder, and keeps the sweep's teacher.
    cfg = with_overrides(user_base, best.params | {"output_dir": str(root.parent / f"{root.name}-best"),
                                                   "teacher.checkpoint": str(user_base.teacher_checkpoint)})
    header = (f"# Best trial of sweep {spec.name!r} ({best.trial}): final {spec.metric} {best.final:.2f}, "
              f"best {best.best:.2f} over {best.evaluations} evaluations.\n"
              f"# Run it: muse distill --config {root / 'best_config.yaml'}\n")
    if spec.scheduler.kind == "pbt":
        header += (f"# PBT: this is the trial's last config; it trained under earlier ones and cloned other trials'\n"
                   f"# weights on the way (see {root / 'trials' / best.trial / 'segments.jsonl'}), so a run of this\n"
                   "# file from scratch is a new experiment, not a replay.\n")
    path = root / "best_config.yaml"
    atomic_write(path, lambda tmp: tmp.write_text(header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
    return path


def _write_results(rows: list[TrialRow], spec: SweepSpec, root: Path) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["trial", "status", *spec.space, f"final_{spec.metric}", f"best_{spec.metric}", "evaluations"])
            for r in rows:
                writer.writerow([r.trial, r.status, *(_csv_value(r.params[k]) for k in spec.space), r.final, r.best,
                                 r.evaluations])

    return atomic_write(root / "results.csv", write)


def format_table(spec: SweepSpec, rows: list[TrialRow]) -> str:
    header = ["trial", "status", *spec.space, f"final {spec.metric}", "best", "evaluations"]
    body = [[r.trial, r.status, *(_short(r.params[k]) for k in spec.space),
             f"{r.final:.2f}" if r.final is not None else "-", f"{r.best:.2f}" if r.best is not None else "-",
             str(r.evaluations)] for r in sorted(rows, key=lambda r: _rank(r, spec.mode))]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _rank(row: TrialRow, mode: str) -> tuple[bool, float]:
    """Sort key: best first, trials without a value last."""
    value = row.final if row.final is not None else 0.0
    return row.final is None, -value if mode == "max" else value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def _sweep_params(spec: SweepSpec, concurrency: int) -> dict[str, Any]:
    params = {"sweep.name": spec.name, "sweep.config": spec.config, "sweep.overrides": json.dumps(spec.overrides),
              "sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.num_samples": spec.num_samples,
              "sweep.max_concurrent_trials": concurrency, "sweep.search": spec.search.algorithm,
              "sweep.scheduler": spec.scheduler.kind}
    return params | {f"space.{k}": json.dumps(d.model_dump(exclude_none=True)) for k, d in spec.space.items()}


def _close_trial_runs(parent: Tracker, rows: list[TrialRow]) -> None:
    """End the child runs still RUNNING: KILLED for trials the scheduler stopped (their process was
    ended), FAILED for trials that raised, and for every trial of a sweep that failed (no rows)."""
    failed = {r.trial for r in rows if r.status == "error"}
    parent.end_open_children(lambda name: "FAILED" if not rows or name in failed else "KILLED")


def _finish_parent(parent: Tracker, spec: SweepSpec, rows: list[TrialRow], best: TrialRow | None, root: Path,
                   best_config: Path | None) -> None:
    if best is not None:
        parent.log_epoch(0, {f"best_final_{spec.metric}": best.final, "trials": len(rows),
                             "trials_done": sum(r.status == "done" for r in rows)})
        parent.set_tags({"best_trial": best.trial})
    curves = {f"{r.trial}: " + ", ".join(f"{k}={_short(v)}" for k, v in r.params.items()): r.history
              for r in rows if r.history}
    parent.log_accuracy_curves(curves, None, f"sweep {spec.name}", artifact="trials_accuracy.png", key=spec.metric)
    spec_file = root / "sweep.yaml"
    atomic_write(spec_file, lambda tmp: tmp.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)))
    parent.finish([root / "results.csv", spec_file, *([best_config] if best_config else [])])


if __name__ == "__main__":
    sys.exit(main())
