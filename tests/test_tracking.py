"""MLflow tracking of a single-process run, checked by querying MLflow, not only by "no exception"."""

import pytest
from mlflow.tracking import MlflowClient

from muse.config import ConfigError
from muse.engine import run_distillation
from muse.tracking import create_tracker

from conftest import fast_digits_config


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
    assert {"images/epoch0002-8px.png", "images/epoch0002-16px.png"} <= grids
    assert run.info.artifact_uri.startswith("file:///")  # absolute, not relative to the CWD


def test_unreachable_server_is_a_clear_error_or_a_warning(tmp_path):
    cfg = fast_digits_config(tmp_path, tmp_path, "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="tracking.uri 'http://127.0.0.1:9' is not reachable"):
        create_tracker(cfg)
    lenient = fast_digits_config(tmp_path, tmp_path, "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9",
                                 "tracking.required=false")
    assert create_tracker(lenient).run_id is None
