"""Config loading: shipped configs, presets, overrides, and one clear error per bad value."""

from pathlib import Path

import numpy as np
import pytest
import torch

from muse.config import ConfigError, ablation, ablation_names, load_config, parse_overrides, shipped_configs
from muse.embeddings import label_embeddings
from muse.runtime import resolve_device
from muse.cli import main


def test_shipped_configs_load_and_validate():
    assert {"digits", "mnist"} <= set(shipped_configs())
    for name in shipped_configs():
        cfg = load_config(name)
        assert cfg.data.name in name or name == "digits"


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = load_config("digits", ["loss.kr=2.0", "resolution.set=[12,8]", "seed=3", "data.resolution=16"])
    assert cfg.loss.kr == 2.0
    assert cfg.resolution.set == [8, 12]
    assert cfg.seed == 3
    assert parse_overrides(["a.b=[1, 2]"]) == {"a.b": [1, 2]}


def test_nayer_preset_switches_off_the_muse_additions():
    cfg = load_config("digits", ["method=nayer"])
    assert cfg.resolution.set == [16] and cfg.resolution.schedule == "fixed"
    assert cfg.loss.kr == cfg.loss.aed == cfg.loss.ed == 0.0
    assert cfg.loss.bn == 10.0 and cfg.loss.adv == 1.33  # NAYER's own terms stay


def test_overrides_win_over_the_preset():
    assert load_config("digits", ["method=nayer", "loss.kr=1.0"]).loss.kr == 1.0


def test_relative_paths_are_taken_from_the_working_directory_at_load(tmp_path, monkeypatch):
    # Ray Train workers run in another working directory: a path kept relative would name another file.
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mnist", ["data.root=../data/mnist", "teacher.checkpoint=teachers/t.pt",
                                "pool.directory=~/pool", "output_dir=runs/a"])
    assert cfg.data.root == tmp_path.parent / "data" / "mnist"
    assert cfg.teacher.checkpoint == tmp_path / "teachers" / "t.pt"
    assert cfg.pool.directory == Path.home() / "pool"
    assert cfg.output_dir == tmp_path / "runs" / "a"
    assert load_config("digits").output_dir == tmp_path / "runs" / "digits"
    cfg.output_dir = Path("elsewhere")  # assignment is validated too
    assert cfg.output_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize("override, message", [
    (["loss.krr=1"], "loss.krr: unknown field"),
    (["synthesis.g_steps=many"], "synthesis.g_steps: Input should be a valid integer"),
    (["resolution.set=[]"], "resolution.set: must name at least one resolution"),
    (["resolution.set=[8,8]"], "resolution.set: resolutions must be distinct"),
    (["resolution.weights=[1.0]"], "resolution.weights has 1 entries but resolution.set has 2"),
    (["loss.bn=-1"], "loss.bn: Input should be greater than or equal to 0"),
    (["embedding.source=clip"], "embedding.source: must be 'teacher-fc', 'random' or 'file:PATH.npy'"),
    (["data.name=mnist"], "data.root is required for data.name='mnist'"),
    (["method=deepdream"], "method: unknown preset 'deepdream'"),
    (["loss.kr"], "override 'loss.kr' must look like section.field=value"),
    (["teacher.arch=notamodel"], "teacher.arch: 'notamodel' is not a timm model name"),
    (["student.arch=resnet81"], "student.arch: 'resnet81' is not a timm model name; did you mean resnet18"),
    (["resolution.set=[8,4096]"], "resolution.set: [8, 4096] goes above the evaluation resolution 16 of 'digits'"),
    (["synthesis.warmup=0", "synthesis.g_loops=0"], "synthesis: warmup=0 and g_loops=0 synthesise nothing"),
    (["device=gpu"], "device: must be auto, cpu, cuda, cuda:N or mps"),
])
def test_invalid_values_fail_with_the_field_and_reason(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("digits", override)


def test_missing_config_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_embeddings_file_with_wrong_class_count_is_refused(tmp_path):
    path = tmp_path / "clip.npy"
    np.save(path, np.ones((7, 4), dtype=np.float32))
    cfg = load_config("digits", [f"embedding.source=file:{path}"])
    with pytest.raises(ConfigError, match="has 7 rows but the teacher has 10 classes"):
        label_embeddings(cfg.embedding, torch.nn.Linear(2, 10), num_classes=10, seed=0)


def test_embedding_sources_give_unit_rows(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.arange(30, dtype=np.float32).reshape(10, 3) + 1)
    cfg = load_config("digits", [f"embedding.source=file:{path}"])
    from_file = label_embeddings(cfg.embedding, None, 10, 0)
    random = label_embeddings(load_config("digits", ["embedding.source=random", "embedding.dim=16"]).embedding,
                              None, 10, 0)
    assert from_file.shape == (10, 3) and random.shape == (10, 16)
    assert torch.allclose(random @ random.T, torch.eye(10), atol=1e-5)  # orthogonal codes
    assert torch.allclose(from_file.norm(dim=1), torch.ones(10))
    with pytest.raises(ConfigError, match="does not exist"):
        label_embeddings(load_config("digits", ["embedding.source=file:/no/such.npy"]).embedding, None, 10, 0)


def test_ablations_switch_off_one_addition_each():
    cfg = load_config("digits")
    assert ablation_names(cfg) == ["muse-no-kr", "muse-no-ed", "muse-no-aed", "muse-at-8", "muse-at-16"]
    no_kr = ablation(cfg, "muse-no-kr")
    assert (no_kr.loss.kr, no_kr.loss.ed, no_kr.loss.aed) == (0.0, cfg.loss.ed, cfg.loss.aed)
    assert ablation(cfg, "muse-no-ed").loss.ed == 0.0 and ablation(cfg, "muse-no-ed").loss.kr == cfg.loss.kr
    assert ablation(cfg, "muse-no-aed").loss.aed == 0.0
    at8 = ablation(cfg, "muse-at-8")
    assert at8.resolution.set == [8] and at8.resolution.schedule == "fixed" and at8.loss.kr == cfg.loss.kr
    with pytest.raises(ConfigError, match="unknown ablation 'muse-at-32'"):
        ablation(cfg, "muse-at-32")


def test_a_budget_names_its_amount():
    with pytest.raises(ConfigError, match="budget.kind=pixels needs budget.amount"):
        load_config("digits", ["budget.kind=pixels"])
    with pytest.raises(ConfigError, match="budget.amount is for kind images, pixels or seconds"):
        load_config("digits", ["budget.amount=5"])
    cfg = load_config("digits", ["budget.kind=seconds", "budget.amount=90"])
    assert (cfg.budget.kind, cfg.budget.amount) == ("seconds", 90.0)


def test_a_field_typed_twice_is_named_and_the_last_value_wins(capsys):
    assert main(["show-config", "--config", "digits", "seed=1", "loss.kr=1", "seed=2"]) == 0
    captured = capsys.readouterr()
    assert "warning: seed is given more than once; the last value (2) is used" in captured.err
    assert "seed: 2" in captured.out and "loss.kr" not in captured.err


def test_a_device_this_machine_lacks_is_refused_at_start_up(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda:1' but this machine has no CUDA device: use device=auto"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["distill", "--config", "digits", f"output_dir={blocker / 'run'}", "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir '{blocker / 'run'}' cannot be written" in err and "choose a folder you can write" in err
    assert not (tmp_path / "teachers").exists()  # refused before the teacher was trained


def test_the_teacher_cache_is_keyed_by_everything_that_defines_the_teacher(tmp_path):
    base = load_config("mnist", ["data.root=/data/mnist", f"output_dir={tmp_path}/run"])
    same = load_config("mnist", ["data.root=/data/mnist", f"output_dir={tmp_path}/other", "distill.epochs=3",
                                 "data.eval_batch_size=64"])
    assert same.teacher_checkpoint == base.teacher_checkpoint  # nothing that trains the teacher changed
    assert base.teacher_checkpoint.parent == tmp_path / "teachers"
    for change in ("data.root=/elsewhere", "data.resolution=64", "teacher.epochs=3", "teacher.lr=0.01", "seed=1"):
        other = load_config("mnist", ["data.root=/data/mnist", f"output_dir={tmp_path}/run", change])
        assert other.teacher_checkpoint != base.teacher_checkpoint, change
        assert other.teacher_checkpoint.name.startswith("mnist-lenet5-")
