"""Ctrl+C of `muse distill`: one line, exit 130, the student so far and a summary marked interrupted, the
MLflow run KILLED, and `--resume` finishes the run from its last committed checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import FAST_DIGITS

REPO = Path(__file__).resolve().parents[1]


def test_ctrl_c_saves_the_student_and_the_run_resumes(tmp_path, teacher_dir):
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST_DIGITS if not o.startswith(("tracking.", "distill.epochs"))]
    command = [sys.executable, "-m", "muse.cli", "distill", "--config", "digits", *overrides, "distill.epochs=10",
               "checkpoint_every=1", f"output_dir={run_dir}", f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    pointer = run_dir / "checkpoint_latest.json"  # older checkpoint folders are removed as newer ones commit
    while not pointer.exists() or json.loads(pointer.read_text())["epoch"] < 4:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130, err
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
