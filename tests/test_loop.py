"""One epoch loop for both runners: a staged single-process run (`muse distill --stop-after-epoch`, then
`--resume`) ends exactly where an uninterrupted one does, and a tiny config run through `muse distill`
and through the Ray runner (one generator, one Train worker) leaves run states and checkpoints of the
same kind. The Ray run also loads label embeddings from a relative `file:` path, which its Train worker
(another working directory) must find."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from muse.checkpoint import (LOCAL_POINTER, STATE_FILE, TRAIN_SNAPSHOT, latest_checkpoint, prepare_output_dir,
                             read_ranks, read_saved_run)
from muse.cli import main as muse_main
from muse.config import load_config
from muse.loop import episodes_to_take
from muse.models import classifier_weight
from muse.pool import SyntheticPool
from muse.teacher import ensure_teacher, load_teacher

from conftest import FAST_DIGITS, fast_digits_config, train_ready_cluster

SHORT = ["distill.epochs=3", "distill.kd_steps=10"]  # with FAST_DIGITS' 2 warm-up epochs: 5 epochs


def distill(*args: str) -> int:
    return muse_main(["distill", "--config", "digits", *args])


def overrides(output_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return [*FAST_DIGITS, *SHORT, f"output_dir={output_dir}", f"teacher.checkpoint={teacher}", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, teacher_dir, digits_splits) -> Path:
    cfg = fast_digits_config(tmp_path_factory.mktemp("loop"), teacher_dir)
    ensure_teacher(cfg, digits_splits)
    return cfg.teacher_checkpoint


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, teacher) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("local")
    assert distill(*overrides(root / "whole", teacher)) == 0
    assert distill(*overrides(root / "staged", teacher), "--stop-after-epoch", "3") == 0
    stopped = json.loads((root / "staged" / "summary.json").read_text())
    stop_checkpoint = latest_checkpoint(root / "staged").name
    assert distill("--resume", str(root / "staged")) == 0
    return {"root": root, "stopped": stopped, "stop_checkpoint": stop_checkpoint,
            "whole": json.loads((root / "whole" / "summary.json").read_text()),
            "resumed": json.loads((root / "staged" / "summary.json").read_text())}


def test_stop_after_epoch_checkpoints_and_summarises_the_epochs_done(local_runs):
    stopped = local_runs["stopped"]
    assert stopped["epochs_done"] == 3 and local_runs["stop_checkpoint"] == "checkpoint_epoch0003"
    assert [h["epoch"] for h in stopped["history"]] == [3] and stopped["kd_steps"] == 10


def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(local_runs):
    whole, resumed = local_runs["whole"], local_runs["resumed"]
    for key in ("epochs_done", "kd_steps", "synthesis_episodes"):
        assert resumed[key] == whole[key]
    assert whole["epochs_done"] == 5 and whole["kd_steps"] == 30 and whole["synthesis_episodes"] == 2 * 3 + 3 * 1
    assert resumed["synthesis"]["images"] == whole["synthesis"]["images"]
    assert resumed["synthesis"]["pixels"] == whole["synthesis"]["pixels"]
    # Every RNG, the pool and the generator are restored: the same student, epoch by epoch.
    assert [h["student_acc"] for h in resumed["history"]] == [h["student_acc"] for h in whole["history"]]
    assert [h["loss_kd"] for h in resumed["history"]] == [h["loss_kd"] for h in whole["history"]]
    # The committed checkpoint moved on and the one it replaced is gone.
    staged = local_runs["root"] / "staged"
    assert json.loads((staged / LOCAL_POINTER).read_text())["checkpoint_dir_name"] == "checkpoint_epoch0005"
    assert sorted(p.name for p in staged.glob("checkpoint_epoch*")) == ["checkpoint_epoch0005"]


def test_a_fresh_run_into_a_used_output_dir_is_refused(local_runs, teacher, capsys):
    assert distill(*overrides(local_runs["root"] / "whole", teacher)) == 2
    assert "holds an earlier run" in capsys.readouterr().err


def test_overwrite_starts_afresh_and_keeps_the_earlier_mlflow_run(tmp_path, teacher, capsys):
    run_dir = tmp_path / "again"
    assert distill(*overrides(run_dir, teacher, "tracking.enabled=true"), "--stop-after-epoch", "2") == 0
    first_pool = {p.name for p in (run_dir / "pool").glob("*.parquet")}
    assert distill(*overrides(run_dir, teacher, "tracking.enabled=true", "seed=1", "resolution.set=[8]"),
                   "--overwrite", "--stop-after-epoch", "1") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["seed"] == 1 and summary["epochs_done"] == 1
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]
    pool = SyntheticPool.load(run_dir / "pool", capacity=10**6)  # only the second run's images, all at 8 px
    assert pool.counts() == {8: summary["synthesis"]["images"]["8"]}
    assert first_pool.isdisjoint(p.name for p in (run_dir / "pool").glob("*.parquet"))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("muse").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]


def test_a_truncated_checkpoint_is_named_on_resume(local_runs, tmp_path, capsys):
    import shutil
    copy = tmp_path / "whole"
    shutil.copytree(local_runs["root"] / "whole", copy)
    state = latest_checkpoint(copy) / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert distill("--resume", str(copy)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {state} cannot be read (" + err.split(" cannot be read (")[1])
    assert "truncated or damaged" in err and "--overwrite" in err


def test_an_unreachable_tracking_server_stops_the_run_before_the_teacher_is_trained(tmp_path, capsys):
    teacher = tmp_path / "teachers" / "never.pt"
    assert distill(*overrides(tmp_path / "run", teacher, "tracking.enabled=true", "tracking.timeout_s=2"),
                   "--mlflow-uri", "http://127.0.0.1:9") == 2
    assert "tracking.uri 'http://127.0.0.1:9' is not reachable" in capsys.readouterr().err
    assert not teacher.exists()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_resumable(local_runs, teacher, tmp_path, monkeypatch,
                                                                          capsys):
    """The 4th checkpoint's state.pt fails to write (ENOSPC): the run stops with one line, exit 1, no summary;
    --resume continues from checkpoint 3 and ends exactly as the uninterrupted run."""
    import errno

    import muse.checkpoint

    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    run_dir = tmp_path / "full"
    with monkeypatch.context() as patch:
        patch.setattr(muse.checkpoint.torch, "save", save_until_full)
        assert distill(*overrides(run_dir, teacher, "checkpoint_every=1")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the run stopped: ") and "No space left on device" in last, last
    assert f"muse distill --resume {run_dir}" in last
    assert not (run_dir / "summary.json").exists() and latest_checkpoint(run_dir).name == "checkpoint_epoch0003"
    assert not list(run_dir.glob(".checkpoint-*"))  # the half-written one is gone
    assert distill("--resume", str(run_dir)) == 0
    resumed, whole = json.loads((run_dir / "summary.json").read_text()), local_runs["whole"]
    assert [h["student_acc"] for h in resumed["history"]] == [h["student_acc"] for h in whole["history"]]
    assert resumed["synthesis"]["pixels"] == whole["synthesis"]["pixels"]


def test_an_empty_ray_snapshot_is_set_aside_and_the_pointer_names_the_checkpoint(tmp_path):
    # What a full disk leaves when Ray Train's in-place rewrite of its snapshot needs one more block.
    for name in ("checkpoint_a", "checkpoint_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_bytes(b"x")
    (tmp_path / TRAIN_SNAPSHOT).write_bytes(b"")
    (tmp_path / LOCAL_POINTER).write_text(json.dumps({"checkpoint_dir_name": "checkpoint_a"}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_a"
    prepare_output_dir(tmp_path, fresh=False)  # as a resume does
    assert not (tmp_path / TRAIN_SNAPSHOT).exists() and (tmp_path / f"{TRAIN_SNAPSHOT}.damaged").exists()
    assert (tmp_path / "checkpoint_a").is_dir() and not (tmp_path / "checkpoint_b").exists()  # never committed


def test_resume_refuses_overrides(local_runs, capsys):
    assert distill("--resume", str(local_runs["root"] / "whole"), "loss.kr=2") == 2
    assert "--resume continues a run with its saved config" in capsys.readouterr().err


PIXEL_BUDGET = 150_000  # warm-up (6 episodes of 50 images at 8 or 16 px) takes about a third
MAX_EPISODE_PIXELS = 50 * 16**2


def assert_budget_spent(summary: dict, pool_dir: Path) -> None:
    """A pixel budget spent to within one episode, accounted exactly: the summary's pixels are those of the
    records synthesised (all in the pool here), and the last evaluation has seen them all."""
    total = summary["synthesis"]["total_pixels"]
    assert PIXEL_BUDGET <= total < PIXEL_BUDGET + MAX_EPISODE_PIXELS
    assert summary["budget"] == {"kind": "pixels", "amount": PIXEL_BUDGET, "spent": total}
    assert total == sum(r.pixels for r in SyntheticPool.load(pool_dir, capacity=10**6).records)
    assert summary["history"][-1]["pixels"] == total
    assert [h["pixels"] for h in summary["history"]] == sorted(h["pixels"] for h in summary["history"])


def test_the_episodes_a_process_takes_are_known_ahead_with_an_epochs_budget():
    cfg = load_config("digits", ["synthesis.warmup=2", "synthesis.gwp_loops=3", "synthesis.g_loops=1",
                                 "distill.epochs=10"])
    assert episodes_to_take(cfg, 0, cfg.total_epochs, world=1) == 2 * 3 + 10 * 1
    assert episodes_to_take(cfg, 0, cfg.total_epochs, world=2) == 2 * 2 + 10 * 1  # each process rounds up
    assert episodes_to_take(cfg, 5, 8, world=1) == 3  # a resumed run up to a stop epoch
    pixels = load_config("digits", ["synthesis.warmup=2", "synthesis.gwp_loops=3", "budget.kind=pixels",
                                    "budget.amount=1e6"])
    assert episodes_to_take(pixels, 0, 2, world=1) == 6  # warm-up still counts episodes
    assert episodes_to_take(pixels, 0, pixels.total_epochs, world=1) is None  # the budget decides


def test_a_pixel_budget_is_spent_and_accounted_exactly(tmp_path, teacher):
    assert distill(*overrides(tmp_path / "budget", teacher), "budget.kind=pixels", f"budget.amount={PIXEL_BUDGET}") == 0
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert_budget_spent(summary, tmp_path / "budget" / "pool")
    assert summary["kd_steps"] == 30 and summary["epochs_done"] == 5  # the KD steps do not depend on the budget


@pytest.mark.slow
def test_engine_and_ray_runs_leave_the_same_kind_of_state(teacher, tmp_path, monkeypatch, digits_splits):
    """The Ray run of the same tiny config has the engine's counters and checkpoint layout."""
    from orchestration.runner import run

    monkeypatch.chdir(tmp_path)
    model, _ = load_teacher(teacher, "digits_cnn", digits_splits.info)
    rows = classifier_weight(model).detach().numpy()
    np.save(tmp_path / "embeddings.npy", np.flip(rows, axis=1).copy())  # any K×d rows will do
    budget = ["budget.kind=pixels", f"budget.amount={PIXEL_BUDGET}"]
    ray_overrides = overrides(Path("ray-run"), teacher, "embedding.source=file:embeddings.npy", *budget,
                              "ray.generators.num_cpus=0.5", "ray.train.cpus_per_worker=0.5")
    local_overrides = overrides(Path("local-run"), teacher, "embedding.source=file:embeddings.npy", *budget)
    with train_ready_cluster(num_cpus=2):
        ray_summary = run(load_config("digits", ray_overrides))
    assert distill(*local_overrides) == 0
    local_summary = json.loads((tmp_path / "local-run" / "summary.json").read_text())

    for key in ("epochs_done", "kd_steps", "synthesis_episodes"):
        assert ray_summary[key] == local_summary[key], key
    for key in ("images", "pixels"):
        assert ray_summary["synthesis"][key] == local_summary["synthesis"][key], key
    assert len(ray_summary["history"]) == len(local_summary["history"]) == 3

    ray_checkpoint, local_checkpoint = latest_checkpoint(tmp_path / "ray-run"), latest_checkpoint(tmp_path / "local-run")
    assert_budget_spent(ray_summary, ray_checkpoint / "pool-rank0")
    assert_budget_spent(local_summary, tmp_path / "local-run" / "pool")
    assert {p.name for p in ray_checkpoint.iterdir()} == {p.name for p in local_checkpoint.iterdir()} == {
        STATE_FILE, "rank0.json", "pool-rank0"}
    assert (torch.load(ray_checkpoint / STATE_FILE, weights_only=True).keys()
            == torch.load(local_checkpoint / STATE_FILE, weights_only=True).keys())
    ray_saved, local_saved = read_saved_run(ray_checkpoint), read_saved_run(local_checkpoint)
    assert len(ray_saved.generators) == len(local_saved.generators) == 1
    assert set(ray_saved.generators[0]) == set(local_saved.generators[0])
    assert read_ranks(ray_checkpoint)[0].keys() == read_ranks(local_checkpoint)[0].keys()
    assert ray_saved.config["embedding"]["source"] == f"file:{tmp_path / 'embeddings.npy'}"
