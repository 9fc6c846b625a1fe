"""Staged runs through `orchestration.run` on a real local cluster: stop after the first distillation
epoch, resume from the checkpoint, and end with the counters of an uninterrupted run of the same
config. One cluster and one teacher for the module; three Train runs (staged, resumed, uninterrupted)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.tracking import MlflowClient
import ray
import ray.train
import timm
import torch

from muse.config import ConfigError
from muse.evaluate import accuracy
from muse.teacher import ensure_teacher
from muse.checkpoint import STATE_FILE, latest_checkpoint
from orchestration.run import main
from orchestration.runner import run

from conftest import fast_digits_config, train_ready_cluster

pytestmark = pytest.mark.slow

# One generator and one Train worker at half a CPU each: two runs fit side by side on 2 CPUs.
TINY = ["ray.generators.num_cpus=0.5", "ray.train.cpus_per_worker=0.5", "synthesis.warmup=1", "distill.epochs=3"]
STOP_AFTER = 2  # epoch 1 is the warm-up, epoch 2 the first distillation epoch (epochs count from 1)
# Final top-1 on the 10 digit classes (chance: 10%): 23-55% measured for this budget on a 2-core CPU
# (the asynchronous feed makes each run differ). 18% is 5 standard deviations above what a
# chance-level student scores on the 360 test images.
WORKING_ACC = 18.0


@pytest.fixture(scope="module")
def cluster():
    with train_ready_cluster(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, teacher_dir, digits_splits):
    """Summaries of the staged run (stopped after STOP_AFTER), its resumption, and an uninterrupted run
    of the same config. The uninterrupted run goes alongside the staged one (shorter when CPUs are free)."""
    root = tmp_path_factory.mktemp("resume")
    staged = fast_digits_config(root / "staged", teacher_dir, *TINY, "tracking.enabled=true")
    uninterrupted = fast_digits_config(root / "uninterrupted", teacher_dir, *TINY)
    ensure_teacher(staged, digits_splits)  # once, before the two runs that load it

    def staged_then_resumed():
        stopped = run(staged, None, stop_after_epoch=STOP_AFTER)
        checkpoint = latest_checkpoint(staged.output_dir)
        stop_files = {p.name for p in checkpoint.iterdir()}
        shards = sorted(p.name for p in (checkpoint / "pool-rank0").glob("*.parquet"))
        return stopped, stop_files, shards, run(staged, ray.train.Checkpoint.from_directory(str(checkpoint)))

    with ThreadPoolExecutor(max_workers=2) as pool:
        staged_future = pool.submit(staged_then_resumed)
        full_future = pool.submit(run, uninterrupted)
        stopped, stop_files, shards, resumed = staged_future.result()
        full = full_future.result()
    return {"cfg": staged, "stopped": stopped, "stop_files": stop_files, "stop_shards": shards,
            "resumed": resumed, "full": full}


def test_stopping_after_the_first_distillation_epoch_leaves_a_complete_checkpoint(runs):
    stopped = runs["stopped"]
    assert stopped["epochs_done"] == STOP_AFTER
    assert stopped["kd_steps"] == runs["cfg"].distill.kd_steps
    assert [h["epoch"] for h in stopped["history"]] == [STOP_AFTER]
    assert {STATE_FILE, "rank0.json", "pool-rank0"} <= runs["stop_files"]
    # the warm-up's gwp_loops batches and the first epoch's g_loops, one shard each
    cfg = runs["cfg"]
    assert len(runs["stop_shards"]) == cfg.synthesis.gwp_loops + cfg.synthesis.g_loops


def test_resumed_run_ends_with_the_counters_of_an_uninterrupted_run(runs):
    resumed, full, cfg = runs["resumed"], runs["full"], runs["cfg"]
    total_epochs = cfg.synthesis.warmup + cfg.distill.epochs
    for summary in (resumed, full):
        assert summary["epochs_done"] == total_epochs
        assert summary["kd_steps"] == cfg.distill.epochs * cfg.distill.kd_steps
        # one history entry per distillation epoch, numbered on from the warm-up
        assert [h["epoch"] for h in summary["history"]] == list(range(cfg.synthesis.warmup + 1, total_epochs + 1))
    assert resumed["synthesis_episodes"] == full["synthesis_episodes"] == (
        cfg.synthesis.warmup * cfg.synthesis.gwp_loops + cfg.distill.epochs * cfg.synthesis.g_loops)
    images = cfg.synthesis.batch_size * full["synthesis_episodes"]
    assert resumed["synthesis"]["total_images"] == full["synthesis"]["total_images"] == images
    # the resumed run carried the stopped run's history over
    assert resumed["history"][0] == runs["stopped"]["history"][0]


def test_the_resumed_runs_mlflow_run_holds_every_epoch(runs):
    cfg, resumed = runs["cfg"], runs["resumed"]
    client = MlflowClient(f"sqlite:///{cfg.output_dir / 'mlflow.db'}")
    stopped_run, resumed_run = sorted(client.search_runs([client.get_experiment_by_name("muse").experiment_id]),
                                      key=lambda r: r.info.start_time)
    assert stopped_run.info.status == resumed_run.info.status == "FINISHED"
    # the epochs before the resume come from the checkpoint, the later ones from the resumed worker
    history = client.get_metric_history(resumed_run.info.run_id, "student_acc")
    assert [m.step for m in history] == [h["epoch"] for h in resumed["history"]]
    assert [m.value for m in history] == pytest.approx([h["student_acc"] for h in resumed["history"]])


def test_resumed_student_is_saved_and_working(runs, digits_splits):
    resumed, cfg = runs["resumed"], runs["cfg"]
    assert resumed["student_acc"] > WORKING_ACC and runs["full"]["student_acc"] > WORKING_ACC
    saved = torch.load(cfg.output_dir / "student.pt", map_location="cpu", weights_only=True)
    assert saved["arch"] == cfg.student.arch
    # `backbone.*` is the plain timm classifier: it scores what the run reported (to one image: this
    # process may sum in another order than the Train worker did)
    info = digits_splits.info
    student = timm.create_model(saved["arch"], num_classes=info.num_classes, in_chans=info.in_chans)
    student.load_state_dict({k.removeprefix("backbone."): v for k, v in saved["state_dict"].items()
                             if k.startswith("backbone.")})
    one_image = 100.0 / len(digits_splits.test)
    assert accuracy(student, digits_splits.test) == pytest.approx(resumed["student_acc"], abs=one_image)


def test_a_fresh_run_into_a_used_output_dir_is_refused(runs):
    # Ray Train would restore the old run from the folder's snapshot and silently continue it.
    with pytest.raises(ConfigError, match="--resume"):
        run(runs["cfg"])


def test_resume_of_a_folder_without_checkpoints_exits_2(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {str(tmp_path)!r}: no committed checkpoint_*/{STATE_FILE} there" in err


def test_the_loop_in_the_driver_commits_its_checkpoints_and_resumes(cluster, tmp_path, teacher_dir):
    # `--workers 0` is Ray Train's local mode, which persists no checkpoint: the run commits its own.
    cfg = fast_digits_config(tmp_path / "local", teacher_dir, *TINY, "ray.train.count=0")
    stopped = run(cfg, None, stop_after_epoch=STOP_AFTER)
    assert stopped["epochs_done"] == STOP_AFTER
    checkpoint = latest_checkpoint(cfg.output_dir)
    assert checkpoint.name == f"checkpoint_epoch{STOP_AFTER:04d}" and checkpoint.parent == cfg.output_dir
    assert stopped["checkpoint"] == str(checkpoint)
    resumed = run(cfg, ray.train.Checkpoint.from_directory(str(checkpoint)))
    total_epochs = cfg.synthesis.warmup + cfg.distill.epochs
    assert resumed["epochs_done"] == total_epochs
    assert latest_checkpoint(cfg.output_dir).name == f"checkpoint_epoch{total_epochs:04d}"
    assert not (cfg.output_dir / checkpoint.name).exists()  # the committed one it replaced is gone
    assert [h["epoch"] for h in resumed["history"]] == list(range(cfg.synthesis.warmup + 1, total_epochs + 1))
    assert (cfg.output_dir / "student.pt").is_file()
