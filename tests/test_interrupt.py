"""Ctrl+C of `muse distill` and of `python orchestration/run.py`: one line, exit 130, the student so far and
a summary marked interrupted, the MLflow run KILLED, and `--resume` finishes the run from its last
committed checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from muse.checkpoint import committed_checkpoints

from conftest import FAST_DIGITS, default_sigint

REPO = Path(__file__).resolve().parents[1]


def ctrl_c_when(command: list[str], ready: Callable[[], bool], env: dict[str, str], wait_s: float = 420,
                exit_s: float = 180) -> tuple[int, str]:
    """Start `command`, send it SIGINT once `ready()` (within `wait_s`), and return its exit code and
    stderr; a process that does not exit within `exit_s` is killed with its whole session."""
    with default_sigint():
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s
        while not ready():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=exit_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, err


def test_ctrl_c_saves_the_student_and_the_run_resumes(tmp_path, teacher_dir):
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST_DIGITS if not o.startswith(("tracking.", "distill.epochs"))]
    command = [sys.executable, "-m", "muse.cli", "distill", "--config", "digits", *overrides, "distill.epochs=10",
               "checkpoint_every=1", f"output_dir={run_dir}", f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    pointer = run_dir / "checkpoint_latest.json"  # older checkpoint folders are removed as newer ones commit
    returncode, err = ctrl_c_when(command, lambda: pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 4,
                                  env, wait_s=300, exit_s=120)

    assert returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["interrupted"]
    assert stopped["after_epoch"] >= 4 and stopped["resume_from"].startswith("checkpoint_epoch")
    assert f"muse distill --resume {run_dir}" in lines[0] and (run_dir / "student.pt").is_file()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("muse").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]

    resumed = subprocess.run([sys.executable, "-m", "muse.cli", "distill", "--resume", str(run_dir), "--no-tracking"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((run_dir / "summary.json").read_text())
    assert "interrupted" not in final and final["epochs_done"] == 2 + 10
    assert [h["epoch"] for h in final["history"]] == list(range(3, 13))


@pytest.mark.slow
def test_ctrl_c_of_the_ray_runner_keeps_the_last_checkpoint_and_resumes(tmp_path, teacher_dir, digits_splits):
    """The same on Ray (`orchestration/run.py`, a local cluster it starts): one line, exit 130, the student
    and summary of the last committed checkpoint, the MLflow run KILLED; --resume finishes the run."""
    from muse.teacher import ensure_teacher
    from conftest import fast_digits_config

    teacher = fast_digits_config(tmp_path, teacher_dir)
    ensure_teacher(teacher, digits_splits)
    run_dir = tmp_path / "ray-run"
    overrides = [o for o in FAST_DIGITS if not o.startswith(("tracking.", "distill."))]
    command = [sys.executable, "orchestration/run.py", "--num-cpus", "2", *overrides, "distill.epochs=8",
               "distill.kd_steps=10", "checkpoint_every=1", "ray.generators.num_cpus=0.5",
               "ray.train.cpus_per_worker=0.5", f"output_dir={run_dir}",
               f"teacher.checkpoint={teacher.teacher_checkpoint}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    # 2 warm-up epochs and 2 distillation epochs committed
    returncode, err = ctrl_c_when(command, lambda: len(committed_checkpoints(run_dir)) >= 4, env)

    assert returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["interrupted"]
    assert stopped["after_epoch"] >= 4 and stopped["resume_from"].startswith("checkpoint_")
    assert summary["epochs_done"] == stopped["after_epoch"] and (run_dir / "student.pt").is_file()
    assert f"python orchestration/run.py --resume {run_dir}" in lines[0]
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("muse").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]

    resumed = subprocess.run([sys.executable, "orchestration/run.py", "--num-cpus", "2", "--resume", str(run_dir),
                              "--no-tracking"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())
    assert "interrupted" not in final and final["epochs_done"] == 2 + 8


@pytest.mark.slow
def test_ctrl_c_of_a_sweep_marks_its_cut_off_trials_unfinished_and_exits_130(tmp_path, teacher_dir, digits_splits):
    """`python sweeps/run.py`: Ctrl+C once both trials are under way. Tune ends every trial and counts them
    all as terminated; the sweep still tells the cut-off ones (no final result) from finished ones."""
    import yaml

    from muse.teacher import ensure_teacher
    from conftest import fast_digits_config

    teacher = fast_digits_config(tmp_path, teacher_dir)
    ensure_teacher(teacher, digits_splits)
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in FAST_DIGITS if not o.startswith(("distill.", "tracking."))]
    spec = {"name": "cut", "config": "digits", "output_dir": str(sweep_dir), "max_concurrent_trials": 2,
            "overrides": [*overrides, "distill.epochs=30", "distill.kd_steps=10", "ray.generators.num_cpus=0.45",
                          "ray.train.cpus_per_worker=0.45", f"teacher.checkpoint={teacher.teacher_checkpoint}"],
            "space": {"loss.kr": {"grid": [0.0, 1.0]}}}
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    def both_under_way() -> bool:
        return len(list(sweep_dir.glob("trials/*/segment-00/checkpoint_latest.json"))) >= 2

    returncode, err = ctrl_c_when([sys.executable, "sweeps/run.py", str(tmp_path / "cut.yaml"), "--num-cpus", "2"],
                                  both_under_way, env, exit_s=240)

    assert returncode == 130, err[-3000:]
    assert "interrupted with 2 trial(s) unfinished" in err and "continue with the same command plus --resume" in err
    statuses = [line.split(",")[1] for line in (sweep_dir / "results.csv").read_text().splitlines()[1:]]
    assert statuses == ["unfinished", "unfinished"]
    assert not (sweep_dir / "best_config.yaml").exists()
    client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cut").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED"] * 3  # the sweep's parent run and both trials
