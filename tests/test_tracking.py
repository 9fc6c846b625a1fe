"""MLflow tracking of a single-process run, checked by querying MLflow, not only by "no exception"."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from muse.config import ConfigError
from muse.engine import run_distillation
from muse.tracking import finish_tracking
from muse.tracking import MlflowTracker, create_tracker

from conftest import fast_digits_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, digits_splits):
    root = tmp_path_factory.mktemp("tracked")
    cfg = fast_digits_config(root / "run", root, "tracking.enabled=true", "distill.epochs=3",
                             "tracking.experiment=tests")
    summary = run_distillation(cfg, digits_splits, progress=False)
    client = MlflowClient(f"sqlite:///{(root / 'run' / 'mlflow.db').resolve()}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    return cfg, summary, client, run


def test_params_are_the_flattened_config(tracked):
    cfg, _, _, run = tracked
    assert run.data.params["loss.kr"] == str(cfg.loss.kr)
    assert run.data.params["resolution.set"] == "[8, 16]"
    assert run.info.status == "FINISHED"


def test_metric_histories_follow_the_epochs(tracked):
    _, summary, client, run = tracked
    accuracy = client.get_metric_history(run.info.run_id, "student_acc")
    assert [m.step for m in accuracy] == [h["epoch"] for h in summary["history"]]
    assert [m.value for m in accuracy] == pytest.approx([h["student_acc"] for h in summary["history"]])
    for name in ("loss_kd", "loss_ed", "synthesis_bn", "images_8px", "images_16px", "lr"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3, name


def test_artifacts_include_image_grids_per_resolution(tracked):
    cfg, _, client, run = tracked
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "student.pt", "config.yaml", "images"} <= top
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert {"images/epoch0003-8px.png", "images/epoch0003-16px.png"} <= grids
    assert run.info.artifact_uri.startswith("file:///")  # absolute, not relative to the CWD



def test_experiment_opens_on_runs_and_runs_carry_standard_tags(tracked):
    cfg, _, client, run = tracked
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's runs table
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert (tags["muse.method"], tags["muse.dataset"], tags["muse.teacher"], tags["muse.student"]) == (
        "muse", "digits", "digits_cnn", "digits_cnn_half")
    assert tags["muse.command"] and "digits_cnn into digits_cnn_half on digits" in tags["mlflow.note.content"]
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():  # a source checkout (CI's clean clone is one): the commit that ran
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head


def test_pictures_are_labelled_and_every_resolution_is_side_by_side(tracked, tmp_path):
    _, _, client, run = tracked
    assert {a.path for a in client.list_artifacts(run.info.run_id, "resolutions")} == {
        f"resolutions/epoch{e:04d}.png" for e in (3, 4, 5)}
    grid = Image.open(client.download_artifacts(run.info.run_id, "images/epoch0005-8px.png", str(tmp_path)))
    # 50 images of 8 px, each shown at 48 px (6×) with a caption row: 7 rows of 8 tiles, not a 2× thumbnail
    assert grid.width > 8 * 48 and grid.height > 7 * 48

def test_unreachable_server_is_a_clear_error_or_a_warning(tmp_path):
    cfg = fast_digits_config(tmp_path, tmp_path, "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="tracking.uri 'http://127.0.0.1:9' is not reachable"):
        create_tracker(cfg)
    lenient = fast_digits_config(tmp_path, tmp_path, "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9",
                                 "tracking.required=false")
    assert create_tracker(lenient).run_id is None


def test_cam_overlays_and_accuracy_curve_are_pngs(tracked, tmp_path):
    _, summary, client, run = tracked
    cams = {a.path for a in client.list_artifacts(run.info.run_id, "cam")}
    assert {"cam/epoch0003-8px.png", "cam/epoch0003-16px.png"} <= cams
    for path in ("cam/epoch0003-16px.png", "accuracy_curve.png"):
        local = Path(client.download_artifacts(run.info.run_id, path, str(tmp_path)))
        assert local.read_bytes()[:8] == PNG_MAGIC, path
    throughput = client.get_metric_history(run.info.run_id, "synthesis_images_per_s")
    assert len(throughput) == 3 and all(m.value > 0 for m in throughput)
    final = client.get_metric_history(run.info.run_id, "final_student_acc")
    assert [m.value for m in final] == pytest.approx([summary["student_acc"]])


def test_a_store_failing_mid_run_warns_once_and_the_run_goes_on(capsys):
    tracker = MlflowTracker("http://127.0.0.1:9", "no-such-run")  # nothing listens on port 9
    tracker.log_epoch(0, {"student_acc": 50.0})
    tracker.set_tags({"a": "b"})
    tracker.finish([])
    assert tracker.failure.startswith("log metrics: ")
    assert capsys.readouterr().err.count("goes on WITHOUT tracking") == 1


def test_the_driver_logs_the_epochs_rank_0_failed_to_log(tmp_path, capsys):
    # On a multi-node cluster Ray Train's rank 0 may not reach a local store: the driver, which closes
    # the run, then logs what is missing from the run's history (and nothing twice).
    cfg = fast_digits_config(tmp_path / "run", tmp_path, "tracking.enabled=true")
    driver = MlflowTracker.start(cfg)
    driver.log_epoch(1, {"student_acc": 20.0, "lr": 0.1})  # rank 0 logged this epoch, then failed
    rank0 = MlflowTracker.attach({"uri": "http://127.0.0.1:9", "run_id": driver.run_id})
    rank0.log_epoch(2, {"student_acc": 30.0})
    assert "the driver logs the missing epochs' metrics" in capsys.readouterr().err
    history = [{"epoch": e, "student_acc": a, "lr": 0.1, "synthesis_loss": {"bn": 1.5}}
               for e, a in [(1, 20.0), (2, 30.0), (3, 40.0)]]
    summary = {"history": history, "student_acc": 40.0, "best_acc": 40.0, "teacher_acc": 99.0, "wall_s": 1.0}

    finish_tracking(driver, cfg, summary, step=4)

    accuracy = driver.client.get_metric_history(driver.run_id, "student_acc")
    assert [(m.step, m.value) for m in accuracy] == [(1, 20.0), (2, 30.0), (3, 40.0)]
    assert [m.step for m in driver.client.get_metric_history(driver.run_id, "synthesis_bn")] == [2, 3]
    assert driver.client.get_run(driver.run_id).info.status == "FINISHED"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped by its process group when the test ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri, tmp_path / "server-artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_run_logs_to_an_mlflow_server_over_http(mlflow_server, tmp_path, teacher_dir, digits_splits):
    uri, artifact_root = mlflow_server
    cfg = fast_digits_config(tmp_path / "run", teacher_dir, "tracking.enabled=true", f"tracking.uri={uri}",
                             "distill.epochs=2", "tracking.experiment=http")
    summary = run_distillation(cfg, digits_splits, progress=False)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("http").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["distill.epochs"] == "2"
    accuracy = client.get_metric_history(run.info.run_id, "student_acc")
    assert [m.value for m in accuracy] == pytest.approx([h["student_acc"] for h in summary["history"]])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    grid = Path(client.download_artifacts(run.info.run_id, "images/epoch0003-16px.png", str(tmp_path)))
    assert grid.read_bytes()[:8] == PNG_MAGIC
    assert list(artifact_root.rglob("epoch0003-16px.png")), "the server stored the artifact"
    assert not (tmp_path / "run" / "mlflow.db").exists()
