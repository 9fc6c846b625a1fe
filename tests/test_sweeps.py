"""Sweeps: the spec's checks, trial resources, and two real small sweeps on a local cluster (ASHA +
Optuna; PBT over the resolution schedule), checked through MLflow, the sweep's files and the state API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors, list_placement_groups

from muse.config import ConfigError, load_config
from muse.teacher import ensure_teacher
from sweeps.run import TrialRow, _best, _search, concurrent_trials, format_table, run_sweep, trial_resources
from sweeps.spec import SweepSpec, load_sweep
from sweeps.trial import SEGMENT_LOG, SegmentClock, _boundary_result, segment_boundaries

from conftest import FAST_DIGITS, train_ready_cluster

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
# Each trial: 0.1 CPU driver + 0.45 generator + 0.45 Train worker, so two trials fit on 2 CPUs.
TINY = [*FAST_DIGITS, "tracking.enabled=true", "synthesis.warmup=1", "synthesis.gwp_loops=2", "synthesis.g_steps=5",
        "distill.kd_steps=10", "ray.generators.num_cpus=0.45", "ray.train.cpus_per_worker=0.45"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep(folder: Path, teacher_dir: Path, **fields) -> Path:
    body = {"config": "digits", "overrides": [*TINY, f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}"],
            "output_dir": str(folder / "out"), "max_concurrent_trials": 2} | fields
    path = folder / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_are_valid(path):
    spec, base = load_sweep(path)
    assert spec.name == path.stem
    demand, _ = trial_resources(spec, base)
    assert concurrent_trials(spec.max_concurrent_trials, demand, {"CPU": 2.0}) == 2  # two at once on 2 cores


@pytest.mark.parametrize("fields, message", [
    ({"space": {"loss.nope": {"choice": [1, 2]}}}, "space entry 'loss.nope' value 1 does not fit the run config"),
    ({"space": {"loss.kr": {"choice": [1.0, -1.0]}}}, "space entry 'loss.kr' value -1.0 does not fit"),
    ({"space": {"resolution.weights": {"choice": [[1, 1], [1, 2, 3]]}}}, "resolution.weights has 3 entries"),
    ({"space": {"loss.kr": {"uniform": [0, 1], "choice": [1]}}}, "give exactly one of"),
    ({"space": {"loss.kr": {"loguniform": [0, 1]}}}, "low > 0"),
    ({"search": {"algorithm": "optuna"}, "space": {"loss.kr": {"grid": [0, 1]}}}, "optuna samples the space itself"),
    ({"scheduler": {"kind": "pbt"}, "space": {"resolution.schedule": {"choice": ["cycle"]}}}, "PBT needs a population"),
    ({"space": {"loss.kr": {"choice": [0, 1], "mutate": [0, 1]}}}, "`mutate` lists are for scheduler.kind=pbt"),
    ({"space": {}}, "space"),
    ({"metric": "student_accuracy"}, "metric"),
    ({"overrides": ["ray.train.count=0"]}, "ray.train.count must be >= 1 in a sweep"),
])
def test_bad_sweeps_are_clear_errors(tmp_path, fields, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": "digits", "space": {"loss.kr": {"choice": [1.0]}}} | fields))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_missing_sweep_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found; give a YAML file such as sweeps/loss_weights.yaml"):
        load_sweep(tmp_path / "nope.yaml")


def test_resume_needs_a_sweep_that_tune_saved(tmp_path):
    spec, base = load_sweep(SWEEPS / "kr_schedules.yaml")
    spec = spec.model_copy(update={"output_dir": tmp_path / "sweep"})
    with pytest.raises(ConfigError, match="--resume: no interrupted sweep in"):
        run_sweep(spec, base, resume=True)
    (tmp_path / "sweep" / "tune").mkdir(parents=True)
    (tmp_path / "sweep" / "tune" / "tuner.pkl").write_bytes(b"")  # stopped before any trial started
    with pytest.raises(ConfigError, match="stopped before any trial started"):
        run_sweep(spec, base, resume=True)
    with pytest.raises(ConfigError, match="holds an earlier sweep; continue it with --resume"):
        run_sweep(spec, base)


def test_trial_reserves_driver_and_generators_and_counts_train_workers():
    spec, _ = load_sweep(SWEEPS / "kr_schedules.yaml")
    cfg = load_config("digits", ["ray.generators.count=2", "ray.generators.num_cpus=0.5",
                                 "ray.train.count=2", "ray.train.cpus_per_worker=0.25"])
    demand, bundles = trial_resources(spec, cfg)
    assert bundles == [{"CPU": spec.driver_cpus}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert demand == {"CPU": pytest.approx(spec.driver_cpus + 1.0 + 0.5)}
    assert concurrent_trials(4, demand, {"CPU": 4.0}) == 2  # capped: two whole trials fit
    with pytest.raises(ConfigError, match="one trial needs"):
        concurrent_trials(1, demand, {"CPU": 1.0})


def test_zero_cpu_generators_leave_no_empty_bundle():
    spec, _ = load_sweep(SWEEPS / "kr_schedules.yaml")
    _, bundles = trial_resources(spec, load_config("digits", ["ray.generators.num_cpus=0"]))
    assert bundles == [{"CPU": spec.driver_cpus}]


def test_each_search_algorithm_holds_the_concurrency_limit():
    grid, _ = load_sweep(SWEEPS / "kr_schedules.yaml")
    optuna, _ = load_sweep(SWEEPS / "loss_weights.yaml")
    assert _search(grid, 1).max_concurrent == 1  # Tune ignores max_concurrent_trials for this one
    assert _search(optuna, 3).max_concurrent == 3


def test_pbt_perturbations_stay_in_their_range():
    spec = SweepSpec(name="s", scheduler={"kind": "pbt"}, num_samples=2,
                     space={"loss.kr": {"loguniform": [0.1, 2.0]}, "distill.kd_steps": {"randint": [5, 10]},
                            "resolution.schedule": {"choice": ["cycle", "random"]}})
    perturbed = {"loss.kr": 2.4, "distill.kd_steps": 3.2, "resolution.schedule": "cycle"}
    assert spec.clip_to_space(perturbed) == {"loss.kr": 2.0, "distill.kd_steps": 5, "resolution.schedule": "cycle"}
    assert spec.clip_to_space({"loss.kr": 0.5, "distill.kd_steps": 12.0})["distill.kd_steps"] == 9


def test_pbt_boundaries_follow_the_warmup_and_skip_the_last_epoch():
    # warm-up 5, interval 3, 29 epochs: the first boundary closes the warm-up and 3 epochs of distillation
    assert segment_boundaries(0, warmup=5, interval=3, total=29) == [8, 11, 14, 17, 20, 23, 26]
    assert segment_boundaries(14, warmup=5, interval=3, total=29) == [17, 20, 23, 26]  # after a restart
    assert segment_boundaries(0, warmup=1, interval=1, total=3) == [2]  # epoch 3 is the last: reported with outputs


def test_a_boundary_reaches_tune_like_the_end_of_a_segment():
    metrics = {"epoch": 8, "phase": "distill", "student_acc": 71.5, "kd_steps": 90, "resumed": True}
    assert _boundary_result(metrics, "student_acc", warmup=5) == {
        "epoch": 8, "student_acc": 71.5, "kd_steps": 90, "epochs_done": 8, "evaluations": 3}
    with pytest.raises(ValueError, match="sweep metric 'loss_x' is not in the run's evaluations"):
        _boundary_result(metrics, "loss_x", warmup=5)


def test_the_segment_clock_laps_wall_and_epoch_seconds(monkeypatch):
    now = iter([100.0, 130.0, 151.0])
    monkeypatch.setattr("sweeps.trial.time.monotonic", lambda: next(now))
    clock = SegmentClock(None)  # a new trial: its loop starts at 0 s
    assert clock.lap(20.0) == {"segment_wall_s": 30.0, "segment_loop_s": 20.0}
    assert clock.lap(39.5) == {"segment_wall_s": 21.0, "segment_loop_s": 19.5}


def test_best_trial_skips_failed_ones_and_the_table_follows_the_mode():
    spec = SweepSpec(name="s", metric="loss_kd", mode="min", space={"loss.kr": {"choice": [0.0, 1.0]}})
    rows = [TrialRow("a", "error", {"loss.kr": 0.0}, 0.1, 0.1, 1, []),
            TrialRow("b", "done", {"loss.kr": 1.0}, 0.5, 0.4, 2, []),
            TrialRow("c", "stopped", {"loss.kr": 0.5}, 0.3, 0.3, 1, []),
            TrialRow("d", "error", {"loss.kr": 0.2}, None, None, 0, [])]
    assert _best(rows, "min").trial == "c"
    order = [line.split(" | ")[0].strip() for line in format_table(spec, rows).splitlines()[2:]]
    assert order == ["a", "c", "b", "d"]  # lowest loss first, trials without a value last


@pytest.fixture(scope="module")
def cluster(teacher_dir, digits_splits):
    ensure_teacher(load_config("digits", [*TINY, f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}"]),
                   digits_splits)
    with train_ready_cluster(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def asha_sweep(cluster, tmp_path_factory, teacher_dir):
    folder = tmp_path_factory.mktemp("asha")
    path = write_sweep(folder, teacher_dir, name="asha", num_samples=2,
                       search={"algorithm": "optuna", "seed": 0}, scheduler={"kind": "asha", "grace_period": 1},
                       space={"loss.kr": {"loguniform": [0.1, 2.0]}, "resolution.schedule": {"choice": ["random", "cycle"]}})
    spec, base = load_sweep(path, ["distill.epochs=2"])
    outcome = run_sweep(spec, base)
    return spec, base, outcome


@pytest.mark.slow
def test_asha_optuna_sweep_logs_parent_and_child_runs(asha_sweep):
    spec, base, outcome = asha_sweep
    client = MlflowClient(f"sqlite:///{outcome.directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(spec.name)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["sweep.max_concurrent_trials"] == "2"
    assert {"results.csv", "best_config.yaml", "sweep.yaml", "trials_accuracy.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(r.trial for r in outcome.rows)
    for child in children:
        row = next(r for r in outcome.rows if r.trial == child.info.run_name)
        assert float(child.data.params["loss.kr"]) == pytest.approx(row.params["loss.kr"])
        assert child.data.params["resolution.schedule"] == row.params["resolution.schedule"]
        # Rank 0 logs each evaluation to MLflow as it happens; Tune saw the same ones, up to where ASHA
        # stopped the trial (its worker may have logged one more before its process ended).
        accuracy = client.get_metric_history(child.info.run_id, "student_acc")
        seen = len(row.history) if row.status == "stopped" else len(accuracy)
        assert [m.value for m in accuracy][:seen] == pytest.approx([h["student_acc"] for h in row.history])
        assert [m.step for m in accuracy][:seen] == [h["epoch"] for h in row.history]
        grids = {a.path for a in client.list_artifacts(child.info.run_id, "images")}
        assert {f"images/epoch{row.history[0]['epoch']:04d}-{r}px.png" for r in (8, 16)} <= grids
        png = Path(client.download_artifacts(child.info.run_id, sorted(grids)[0], str(outcome.directory)))
        assert png.read_bytes()[:8] == PNG_MAGIC
        # A trial ASHA stopped early was ended with its process: the driver marks its run KILLED.
        assert child.info.status == ("FINISHED" if row.status == "done" else "KILLED")
        if row.status == "done":
            files = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"summary.json", "student.pt", "config.yaml", "accuracy_curve.png"} <= files


@pytest.mark.slow
def test_sweep_writes_a_runnable_best_config_and_a_table(asha_sweep):
    spec, base, outcome = asha_sweep
    assert len(outcome.rows) == 2 and outcome.best is not None
    assert outcome.best.final == max(r.final for r in outcome.rows if r.final is not None)
    best = load_config(outcome.best_config)  # what `muse distill --config <it>` reads
    assert best.loss.kr == pytest.approx(outcome.best.params["loss.kr"])
    assert best.resolution.schedule == outcome.best.params["resolution.schedule"]
    assert best.output_dir == outcome.directory.parent / f"{outcome.directory.name}-best" and best.teacher_checkpoint.is_file()
    assert best.tracking.uri is None and best.distill.epochs == 2
    table = format_table(spec, outcome.rows)
    assert "loss.kr" in table and outcome.best.trial in table
    assert (outcome.directory / "results.csv").read_text().count("\n") == 3


@pytest.mark.slow
def test_generator_actors_ran_in_the_trial_placement_groups(asha_sweep):
    spec, base, _ = asha_sweep
    _, trial_bundles = trial_resources(spec, base)
    groups = {g.placement_group_id: [b["unit_resources"] for b in g.bundles]
              for g in list_placement_groups(detail=True, limit=1000)}
    generators = list_actors(filters=[("class_name", "=", "GeneratorActor")], detail=True, limit=1000)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    assert len(generators) == 2 and len({a.placement_group_id for a in generators}) == 2  # one per trial
    for actor in generators:  # in its trial's group: the driver's bundle and the generator's
        assert groups[actor.placement_group_id] == trial_bundles
    for actor in workers:  # Ray Train reserves its workers in a group of its own
        assert groups[actor.placement_group_id] == [{"CPU": base.ray.train.cpus_per_worker}]


@pytest.fixture(scope="module")
def pbt_sweep(cluster, tmp_path_factory, teacher_dir):
    folder = tmp_path_factory.mktemp("pbt")
    # Two trials start at the two ends of the mutation list, and the population waits at each
    # perturbation (synch): the bottom trial clones the top one, then moves its schedule to a
    # neighbour in the list, which is never its own old schedule.
    path = write_sweep(folder, teacher_dir, name="pbt", num_samples=1,
                       scheduler={"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                                  "resample_probability": 0.0, "synch": True},
                       space={"resolution.schedule": {"grid": ["cycle", "progressive"],
                                                      "mutate": ["cycle", "random", "progressive"]}})
    spec, base = load_sweep(path, ["distill.epochs=2"])
    return spec, run_sweep(spec, base)


@pytest.mark.slow
def test_pbt_mutates_the_schedule_and_continues_from_the_donor_checkpoint(pbt_sweep):
    spec, outcome = pbt_sweep
    trials = outcome.directory / "trials"
    logs = {d.name: [json.loads(line) for line in (d / SEGMENT_LOG).read_text().splitlines()]
            for d in trials.iterdir()}
    assert len(logs) == 2
    exploits = [(trial, before, after) for trial, segments in logs.items()
                for before, after in zip(segments, segments[1:])
                if after["resumed_from"] and trial not in Path(after["resumed_from"]).parts]
    assert exploits, f"no trial continued from another trial's checkpoint: {logs}"
    for trial, before, after in exploits:
        assert any(name in Path(after["resumed_from"]).parts for name in logs)  # the donor's own checkpoint
        assert after["params"]["resolution.schedule"] != before["params"]["resolution.schedule"]
        assert after["start_epoch"] > 0  # it went on from the donor's epoch, not from scratch
        # The next segment ran the mutated schedule from the donor's state: its checkpoint says so.
        segment = trials / trial / after["segment"]
        saved = yaml.safe_load((segment / "config.yaml").read_text())
        assert saved["resolution"]["schedule"] == after["params"]["resolution.schedule"]
    assert all(r.status == "done" for r in outcome.rows)
    client = MlflowClient(f"sqlite:///{outcome.directory / 'mlflow.db'}")
    for trial, _, after in exploits:
        [child] = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id],
                                     filter_string=f"attributes.run_name = '{trial}'")
        assert child.info.status == "FINISHED"
        assert json.loads(child.data.tags[f"segment.{after['segment']}"])["resumed_from"] == after["resumed_from"]
