"""MLflow tracking for a run: the flattened config as params, per-epoch metrics, and artifacts (config,
summary, student checkpoint, an image grid and a teacher-CAM overlay per resolution per evaluation, the
accuracy curve).

The embedded default is an sqlite store in the run's output directory with an absolute artifact
location (`tracking.uri` unset); `tracking.uri=http://host:port` logs to a server. `Tracker`
stands in when tracking is off, so the engine never branches on it.

A tracker writes to one MLflow run through `MlflowClient` and the run's id, so any process can log to
a run another one started: the driver opens the run, Ray Train's rank 0 attaches to it (`attach`) and
logs each epoch as it happens, a sweep's trials open child runs under the sweep's parent run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from muse.config import ConfigError, RunConfig, error_summary
from muse.io import save_json

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient

    from muse.data import DatasetInfo
    from muse.loop import SynthesisTally
    from muse.synthesis import SynthesisRecord

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under this parent
NOTE_TAG = "mlflow.note.content"  # MLflow's own tag: the description shown on a run's or experiment's page
# MLflow 3's UI opens an experiment of this kind on its runs table (else on the GenAI trace overview).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_NOTE = ("muse-ray data-free distillation runs: each run distils a student from a teacher on synthetic "
                   "images; sweeps are parent runs with one child run per trial.")
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


class Tracker:
    """The tracking interface every runner and sweep logs through. This base logs nothing: it stands in
    when tracking is off (or a store was unreachable and `tracking.required=false`)."""

    run_id: str | None = None
    handle: dict[str, str] | None = None  # what another process needs to log to this run

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None: ...

    def log_visuals(self, epoch: int, records: dict[int, SynthesisRecord], teacher: torch.nn.Module | None,
                    info: DatasetInfo, teacher_input: str) -> None: ...

    def log_accuracy_curves(self, curves: dict[str, list[dict[str, Any]]], teacher_acc: float | None, title: str,
                            artifact: str = "accuracy_curve.png", key: str = "student_acc",
                            x: str = "epoch") -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_missing_epochs(self, epochs: dict[int, dict[str, Any]], key: str) -> None: ...

    def end_open_children(self, status_of: Callable[[str], str]) -> None:
        """End this run's child runs still RUNNING, each with `status_of(child run name)`."""

    def finish(self, files: list[Path], status: str = "FINISHED") -> None: ...


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{cfg.output_dir.resolve() / 'mlflow.db'}"


def open_store(cfg: RunConfig) -> tuple[MlflowClient, str]:
    """A client of the run's store (`tracking_uri`) and the id of its experiment there, created if new:
    with its artifacts under the run's `mlartifacts/` for a local store, where the server says for a
    tracking server. An unreachable or broken store is a ConfigError."""
    uri, experiment = tracking_uri(cfg), cfg.tracking.experiment
    artifact_root = cfg.output_dir.resolve() / "mlartifacts"
    _fail_fast(cfg.tracking.timeout_s)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        local = not uri.startswith(("http://", "https://", "databricks"))
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifact_root.resolve().as_uri() if local else None,
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING, NOTE_TAG: EXPERIMENT_NOTE})
        if found and EXPERIMENT_KIND_TAG not in found.tags:  # made by an older muse, or by hand
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except Exception as error:  # MLflow raises several types for an unreachable or broken store
        raise ConfigError(f"tracking.uri {uri!r} is not reachable ({error_summary(error)}); start the server, fix tracking.uri "
                          "(--mlflow-uri), or set tracking.required=false to continue without tracking") from None
    return client, experiment_id


def check_store(cfg: RunConfig) -> None:
    """At start-up, before the teacher is trained: the store of a run that requires tracking can be reached
    (a ConfigError naming the URI if not)."""
    if cfg.tracking.enabled and cfg.tracking.required:
        open_store(cfg)


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """MLflow's standard run tags (user, source file and, inside a git checkout, its commit, as
    `mlflow.start_run` sets them), the command line, what is distilled into what, and a description."""
    from mlflow.tracking.context.registry import resolve_tags

    what = f"{cfg.method} distillation of {cfg.teacher.arch} into {cfg.student.arch} on {cfg.data.name}"
    resolutions = ", ".join(f"{r} px" for r in cfg.resolution.set)
    tags = resolve_tags({
        "muse.command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:5000],
        "muse.method": cfg.method, "muse.dataset": cfg.data.name, "muse.teacher": cfg.teacher.arch,
        "muse.student": cfg.student.arch, "muse.output_dir": str(cfg.output_dir.resolve()),
        NOTE_TAG: f"{what}: synthesis at {resolutions}, {cfg.total_epochs} epochs, seed {cfg.seed}. "
                  f"Outputs in {cfg.output_dir.resolve()}.",
    })
    if "mlflow.source.git.commit" not in tags:  # `muse` runs from the venv's bin/: the code is the package's
        from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

        package = str(Path(__file__).resolve().parent)
        found = {"mlflow.source.git.commit": get_git_commit(package), "mlflow.source.git.branch": get_git_branch(package),
                 "mlflow.source.git.repoURL": get_git_repo_url(package)}
        tags |= {k: v for k, v in found.items() if v}
    return tags


def ui_hint(cfg: RunConfig, store_dir: Path | None = None) -> str | None:
    """How to look at a run tracked to its local store: the `mlflow ui` command and the page that opens
    on the experiment's runs table (the UI's model-training views; it defaults to its GenAI ones). None
    for a tracking server (its address is the user's) or with tracking off."""
    if not cfg.tracking.enabled or cfg.tracking.uri is not None:
        return None
    store = ((store_dir or cfg.output_dir) / "mlflow.db").resolve()
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(f"sqlite:///{store}").get_experiment_by_name(cfg.tracking.experiment)
    page = f"#/experiments/{experiment.experiment_id}" if experiment else ""
    return (f"mlflow: mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000\n"
            f"        then open http://127.0.0.1:5000/{page}?workflowType=machine_learning")


def _fail_fast(timeout_s: int | None = None) -> None:
    # MLflow retries an HTTP request 7 times with backoff, 120 s each, by default: a server that is down
    # would stall a run for minutes at every call. Set in every process that logs (Ray workers too);
    # `timeout_s` is tracking.timeout_s where the config is at hand.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if timeout_s is None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    else:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)


class MlflowTracker(Tracker):
    """Logs to the MLflow run `run_id` of the store at `uri`.

    A store that fails once the run is under way (server restarted, disk full) must not end hours of
    training: the first failed call warns, and the run goes on untracked (its output folder still holds
    the summary, the student and the checkpoints)."""

    def __init__(self, uri: str, run_id: str, after_failure: str = "the run goes on WITHOUT tracking") -> None:
        _fail_fast()
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self.failure: str | None = None
        self.after_failure = after_failure

    def _safely(self, what: str, call: Callable[[], Any]) -> None:
        if self.failure is not None:
            return
        try:
            call()
        except Exception as error:  # any store or network error: see the class docstring
            self.failure = f"{what}: {error_summary(error)}"
            sys.stderr.write(f"warning: MLflow logging to {self.uri} (run {self.run_id}) failed ({self.failure}); "
                             f"{self.after_failure}\n")

    @classmethod
    def start(cls, cfg: RunConfig, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> MlflowTracker:
        """A new run for `cfg` (a child of `parent_run_id` when given), with the flattened config as params."""
        output_dir = cfg.output_dir.resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        client, experiment_id = open_store(cfg)
        tags = run_tags(cfg) | dict(tags or {})
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name or output_dir.name, tags=tags)
        tracker = cls(tracking_uri(cfg), run.info.run_id)
        tracker.log_params(cfg.flat())
        return tracker

    @classmethod
    def attach(cls, handle: dict[str, str] | None) -> Tracker:
        """The tracker of a run another process started (`handle` from `.handle`), or a no-op for None.
        That process logs the metrics of the epochs this one failed to log when it closes the run."""
        if not handle:
            return Tracker()
        return cls(handle["uri"], handle["run_id"], after_failure=(
            "this process logs no more; the driver logs the missing epochs' metrics (not their images) when the "
            "run ends. A local store (sqlite, file) is only reachable from the driver's machine: on a multi-node "
            "cluster use an MLflow server (--mlflow-uri http://host:port)"))

    @property
    def handle(self) -> dict[str, str]:
        return {"uri": self.uri, "run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = items[start:start + MAX_PARAMS_PER_BATCH]
            self._safely("log params", lambda: self.client.log_batch(self.run_id, params=batch))

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numeric = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
        self._safely("log metrics", lambda: self.client.log_batch(self.run_id, metrics=numeric))

    def log_visuals(self, epoch: int, records: dict[int, SynthesisRecord], teacher: torch.nn.Module | None,
                    info: DatasetInfo, teacher_input: str) -> None:
        from muse.visuals import epoch_visuals

        if self.failure is None:
            for path, picture in epoch_visuals(epoch, records, teacher, info, teacher_input).items():
                self._safely("log an image", lambda: self.client.log_image(self.run_id, picture, artifact_file=path))

    def log_accuracy_curves(self, curves: dict[str, list[dict[str, Any]]], teacher_acc: float | None, title: str,
                            artifact: str = "accuracy_curve.png", key: str = "student_acc",
                            x: str = "epoch") -> None:
        from muse.visuals import accuracy_curves

        if any(curves.values()) and self.failure is None:
            figure = accuracy_curves(curves, teacher_acc, title, key=key, x=x)
            self._safely(f"log {artifact}", lambda: self.client.log_figure(self.run_id, figure, artifact))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._safely("set a tag", lambda: self.client.set_tag(self.run_id, key, value))

    def log_missing_epochs(self, epochs: dict[int, dict[str, Any]], key: str) -> None:
        """Log the metrics of each epoch whose `key` metric the run lacks (another process, Ray Train's
        rank 0, logs epochs as they happen, and may have failed to)."""
        logged: set[int] = set()
        self._safely("read the metric history",
                     lambda: logged.update(m.step for m in self.client.get_metric_history(self.run_id, key)))
        for epoch, metrics in epochs.items():
            if epoch not in logged:
                self.log_epoch(epoch, metrics)

    def end_open_children(self, status_of: Callable[[str], str]) -> None:
        def end() -> None:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
            children = self.client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}'")
            for child in children:
                if child.info.status == "RUNNING":
                    self.client.set_terminated(child.info.run_id, status=status_of(child.info.run_name))

        self._safely("end the child runs", end)

    def finish(self, files: list[Path], status: str = "FINISHED") -> None:
        for path in files:
            if Path(path).exists():
                self._safely("log a file", lambda: self.client.log_artifact(self.run_id, str(path)))
        self._safely("end the run", lambda: self.client.set_terminated(self.run_id, status=status))


RUN_RECORD = "mlflow_run.json"  # in output_dir: the MLflow run of the process that last ran there


def run_tracker(cfg: RunConfig, history_before: list[dict[str, Any]]) -> Tracker:
    """The tracker of a run started (or resumed, with the evaluations `history_before` it) in output_dir.
    A resume first closes, as KILLED, the MLflow run a killed process left RUNNING there (SIGKILL, a lost
    machine); the new run is recorded in output_dir for the next resume to find."""
    close_orphaned_run(cfg)
    tracker = create_tracker(cfg)
    log_history(tracker, history_before)
    if isinstance(tracker, MlflowTracker):
        save_json(tracker.handle, cfg.output_dir / RUN_RECORD)
    return tracker


def close_orphaned_run(cfg: RunConfig) -> str | None:
    """Mark KILLED the MLflow run recorded in output_dir if it is still RUNNING; its id, else None."""
    try:
        handle = json.loads((cfg.output_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not cfg.tracking.enabled or handle.get("uri") != tracking_uri(cfg):
        return None
    _fail_fast(cfg.tracking.timeout_s)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(handle["uri"])
        if client.get_run(handle["run_id"]).info.status != "RUNNING":
            return None
        client.set_terminated(handle["run_id"], status="KILLED")
    except Exception as error:  # the store or the run is gone: nothing to close
        print(f"warning: could not close the earlier MLflow run {handle.get('run_id')} ({error_summary(error)})")
        return None
    return handle["run_id"]


def create_tracker(cfg: RunConfig, run_name: str | None = None, parent_run_id: str | None = None,
                   tags: dict[str, str] | None = None) -> Tracker:
    """The run's tracker: MLflow when `tracking.enabled`, else a no-op. An unreachable store is an
    error unless `tracking.required=false`, which continues without tracking and says so."""
    return _tracker_or_warning(cfg, lambda: MlflowTracker.start(cfg, run_name, parent_run_id, tags))


def reopen_tracker(cfg: RunConfig, run_id: str) -> Tracker:
    """The tracker of an existing run in the store of `cfg` (a resumed sweep's parent run), marked
    RUNNING again; the same policy as `create_tracker` for a store that cannot be reached."""
    return _tracker_or_warning(cfg, lambda: _reopen(cfg, run_id))


def child_tracker(cfg: RunConfig, parent_run_id: str | None, key_tag: tuple[str, str], run_name: str,
                  tags: dict[str, str]) -> Tracker:
    """A child run of `parent_run_id` identified by the tag `key_tag` (e.g. a sweep trial's id): the
    run that tag already names, reopened (a trial restarted by PBT or by a resumed sweep), else a new
    one. No parent (the sweep is untracked): no tracking."""
    if parent_run_id is None:
        return Tracker()

    def find_or_start() -> MlflowTracker:
        client, experiment_id = open_store(cfg)
        key, value = key_tag
        found = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
        if found:
            return _reopen(cfg, found[0].info.run_id)
        return MlflowTracker.start(cfg, run_name, parent_run_id, tags | {key: value})

    return _tracker_or_warning(cfg, find_or_start)


def _reopen(cfg: RunConfig, run_id: str) -> MlflowTracker:
    uri = tracking_uri(cfg)
    client, _ = open_store(cfg)
    try:
        client.update_run(run_id, status="RUNNING")
    except Exception as error:  # MlflowException: no such run in this store
        raise ConfigError(f"MLflow run {run_id} is not in {uri} ({error_summary(error)}); was the store moved "
                          "or deleted? Set tracking.required=false to go on without tracking") from None
    return MlflowTracker(uri, run_id)


def _tracker_or_warning(cfg: RunConfig, open_tracker: Callable[[], MlflowTracker]) -> Tracker:
    """`tracking.enabled` and `tracking.required`, applied here for every tracker a run or sweep opens."""
    if not cfg.tracking.enabled:
        return Tracker()
    try:
        return open_tracker()
    except Exception as error:  # ConfigError from open_store, or the store failing on a later call
        if cfg.tracking.required:
            raise
        reason = error if isinstance(error, ConfigError) else error_summary(error)
        print(f"warning: continuing WITHOUT tracking: {reason}")
        return Tracker()


def history_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One history entry as flat metrics: accuracy, learning rate, loss terms, synthesis loss terms."""
    metrics = {k: v for k, v in entry.items() if k not in ("epoch", "synthesis_loss")}
    return metrics | {f"synthesis_{k}": v for k, v in entry["synthesis_loss"].items()}


def log_history(tracker: Tracker, history: list[dict[str, Any]]) -> None:
    """Log evaluations made before this process took over (a resumed run's earlier epochs)."""
    for entry in history:
        tracker.log_epoch(entry["epoch"], history_metrics(entry))


def epoch_metrics(entry: dict[str, Any], tally: SynthesisTally) -> dict[str, float]:
    """What a tracker logs per evaluation: `history_metrics` plus images/pixels synthesised per resolution
    and the generation throughput (images per second of synthesis time)."""
    metrics = history_metrics(entry)
    metrics |= {f"images_{r}px": n for r, n in tally.images.items()}
    metrics |= {f"pixels_{r}px": n for r, n in tally.pixels.items()}  # history_metrics has synthesis_s
    if tally.seconds > 0:
        metrics["synthesis_images_per_s"] = sum(tally.images.values()) / tally.seconds
    return metrics


def finish_tracking(tracker: Tracker, cfg: RunConfig, summary: dict[str, Any], step: int,
                    status: str = "FINISHED") -> None:
    """Close a run's MLflow run: any evaluated epoch it lacks, final and best accuracy, the accuracy
    curve, and the output files."""
    from muse.outputs import OUTPUT_FILES

    tracker.log_missing_epochs({h["epoch"]: history_metrics(h) for h in summary["history"]}, key="student_acc")
    tracker.log_epoch(step, {"final_student_acc": summary["student_acc"], "best_student_acc": summary["best_acc"],
                             "teacher_acc": summary["teacher_acc"], "wall_s": summary["wall_s"]})
    title = f"{cfg.method} on {cfg.data.name}"
    tracker.log_accuracy_curves({"student": summary["history"]}, summary["teacher_acc"], title)
    for x in ("pixels", "synthesis_s"):  # accuracy per unit of synthesis compute
        tracker.log_accuracy_curves({"student": summary["history"]}, summary["teacher_acc"], title,
                                    artifact=f"accuracy_vs_{x}.png", x=x)
    tracker.finish([cfg.output_dir / name for name in OUTPUT_FILES], status=status)
