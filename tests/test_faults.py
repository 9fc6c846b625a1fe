"""Faults on the Ray path, with counts: a Ray Train worker killed mid-run (the group restarts from the last
committed checkpoint and the run completes, `ray.train.max_failures`), generator actors killed again and
again during a run (every episode the student used is accounted once; none is lost), the driver
SIGKILLed, then resumed, and a disk that fills up during a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from muse.checkpoint import (LOCAL_POINTER, STATE_FILE, TRAIN_SNAPSHOT, committed_checkpoints, latest_checkpoint,
                             read_saved_run)
from muse.teacher import ensure_teacher
from orchestration.runner import run

from conftest import FAST_DIGITS, fast_digits_config, train_ready_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

KILL_EVERY_S = 2
FULL_DISK_MB = 3  # the run's checkpoints outgrow it within a few epochs (each holds the pool so far)
RAY_SMALL = ["distill.kd_steps=10", "checkpoint_every=1", "ray.generators.num_cpus=0.5",
             "ray.train.cpus_per_worker=0.5"]


def alive_pids(class_name: str) -> list[int]:
    return [a.pid for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


def run_in_thread(cfg) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run(cfg)
        except BaseException as error:  # reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_killed_train_worker_restarts_from_the_last_checkpoint(tmp_path, teacher_dir, digits_splits):
    cfg = fast_digits_config(tmp_path / "run", teacher_dir, "distill.epochs=6", *RAY_SMALL)
    ensure_teacher(cfg, digits_splits)
    with train_ready_cluster(num_cpus=2):
        thread, outcome = run_in_thread(cfg)
        deadline = time.monotonic() + 420
        while len(committed_checkpoints(cfg.output_dir)) < 4 or not alive_pids("RayTrainWorker"):  # warm-up + 2 epochs committed
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.5)
        [victim] = alive_pids("RayTrainWorker")
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=600)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")])
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["epochs_done"] == 2 + 6
    assert [h["epoch"] for h in summary["history"]] == [3, 4, 5, 6, 7, 8]  # each epoch once, in order
    assert len(workers) >= 2 and victim in {w.pid for w in workers}  # the killed worker, and its replacement
    assert (cfg.output_dir / "student.pt").is_file()


def test_generators_killed_again_and_again_lose_no_episode(tmp_path, teacher_dir, digits_splits):
    """From the first committed epoch to the end of the run, one of the two generator processes is SIGKILLed
    whenever both are up (every KILL_EVERY_S seconds at most): Ray restarts it and retries the calls it had
    in flight, so the run uses exactly the episodes it plans (warm-up 2 × 3, then 20 × 1), each once.
    (Killing faster than a restarted actor can import torch would starve the run: a livelock, not a loss.)"""
    cfg = fast_digits_config(tmp_path / "run", teacher_dir, "distill.epochs=20", "ray.generators.count=2",
                             "ray.generators.num_cpus=0.25", *RAY_SMALL[:2], "ray.train.cpus_per_worker=0.5")
    ensure_teacher(cfg, digits_splits)
    kills = 0
    with train_ready_cluster(num_cpus=2):
        thread, outcome = run_in_thread(cfg)
        deadline = time.monotonic() + 600
        while len(committed_checkpoints(cfg.output_dir)) < 1:  # under way: the first warm-up epoch is committed
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.2)
        while thread.is_alive() and time.monotonic() < deadline:
            pids = sorted(alive_pids("GeneratorActor"))
            if len(pids) == 2:  # the one killed last is back
                try:
                    os.kill(pids[kills % 2], signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            thread.join(timeout=KILL_EVERY_S)
        thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert kills >= 2, f"only {kills} generator processes were killed: the test did not test"
    assert summary["synthesis_episodes"] == 2 * 3 + 20 * 1 and summary["epochs_done"] == 2 + 20
    assert sum(summary["synthesis"]["images"].values()) == (2 * 3 + 20 * 1) * 50
    print(f"generator processes killed: {kills}; episodes used: {summary['synthesis_episodes']}")


def test_a_sigkilled_driver_resumes_and_its_mlflow_run_is_closed(tmp_path, teacher_dir, digits_splits):
    """`orchestration/run.py` and the local cluster it started SIGKILLed mid-run (a lost machine): the MLflow
    run it left RUNNING is marked KILLED by `--resume`, which deletes half-written checkpoint folders and
    finishes the run with the counters of an uninterrupted one."""
    cfg = fast_digits_config(tmp_path / "run", teacher_dir)
    ensure_teacher(cfg, digits_splits)
    run_dir = tmp_path / "run"
    command = [sys.executable, "orchestration/run.py", "--num-cpus", "2",
               *[o for o in FAST_DIGITS if not o.startswith(("tracking.", "distill."))], "distill.epochs=5",
               *RAY_SMALL, f"output_dir={run_dir}", f"teacher.checkpoint={cfg.teacher_checkpoint}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while len(committed_checkpoints(run_dir)) < 3:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its cluster and every worker, without a word
        driver.wait(timeout=60)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [killed] = client.search_runs([client.get_experiment_by_name("muse").experiment_id])
    assert killed.info.status == "RUNNING"  # nobody closed it
    half_written = [run_dir / "checkpoint_2099-01-01_00-00-00.000000", run_dir / ".checkpoint-abc123"]
    for folder in half_written:  # what a kill during a checkpoint write leaves
        (folder / "pool-rank0").mkdir(parents=True)

    resumed = subprocess.run([sys.executable, "orchestration/run.py", "--num-cpus", "2", "--resume", str(run_dir)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 2 + 5 and summary["kd_steps"] == 5 * 10
    assert summary["synthesis_episodes"] == 2 * 3 + 5 * 1
    assert [h["epoch"] for h in summary["history"]] == [3, 4, 5, 6, 7]
    assert not any(folder.exists() for folder in half_written)
    runs = {r.info.run_id: r.info.status for r in client.search_runs([killed.info.experiment_id])}
    assert runs.pop(killed.info.run_id) == "KILLED" and list(runs.values()) == ["FINISHED"]


def test_a_full_disk_during_a_checkpoint_keeps_the_last_committed_one_resumable(tmp_path, teacher_dir, digits_splits):
    """output_dir on a small tmpfs that fills up during a checkpoint: `orchestration/run.py` fails with the
    reason and the command that continues the run (exit 1) and no summary; once there is space (the tmpfs
    made larger), `--resume` continues from the last committed checkpoint and finishes with the counters of
    an uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_DISK_MB}m", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        cfg = fast_digits_config(tmp_path / "unused", teacher_dir)
        ensure_teacher(cfg, digits_splits)
        run_dir = disk / "run"
        command = [sys.executable, "orchestration/run.py", "--num-cpus", "2", "--no-tracking",
                   *[o for o in FAST_DIGITS if not o.startswith(("tracking.", "distill."))], "distill.epochs=8",
                   *RAY_SMALL, "ray.train.max_failures=1", f"output_dir={run_dir}",
                   f"teacher.checkpoint={cfg.teacher_checkpoint}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert full.returncode == 1, full.stderr[-3000:]
        error = full.stderr[full.stderr.index("error: the run failed"):]
        assert "No space left on device" in error and f"python orchestration/run.py --resume {run_dir}" in error, error
        assert not (run_dir / "summary.json").exists()
        committed = latest_checkpoint(run_dir)
        assert 1 <= read_saved_run(committed).epoch < 2 + 8
        assert f"({committed.name}) is intact" in error
        # Ray Train rewrites its snapshot in place: when the rewrite needs one more block than is free, it is
        # left empty. The pointer the run keeps beside it (written atomically) still names a whole checkpoint.
        (run_dir / TRAIN_SNAPSHOT).write_bytes(b"")
        pointed = latest_checkpoint(run_dir)
        assert pointed.name == json.loads((run_dir / LOCAL_POINTER).read_text())["checkpoint_dir_name"]
        assert (pointed / STATE_FILE).is_file()

        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)  # space freed
        resumed = subprocess.run([sys.executable, "orchestration/run.py", "--num-cpus", "2", "--resume", str(run_dir)],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["epochs_done"] == 2 + 8 and summary["kd_steps"] == 8 * 10
        assert summary["synthesis_episodes"] == 2 * 3 + 8 * 1
        assert [h["epoch"] for h in summary["history"]] == list(range(3, 11))
        assert (run_dir / f"{TRAIN_SNAPSHOT}.damaged").exists()  # set aside; Ray Train wrote a new one
        assert latest_checkpoint(run_dir).name != pointed.name
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
