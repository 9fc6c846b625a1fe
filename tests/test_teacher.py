"""Teacher checkpoints: round trip, and one clear error for each way a file can be wrong."""

import pytest
import timm
import torch

from muse.config import ConfigError
from muse.teacher import load_teacher, save_teacher, train_teacher

from conftest import fast_digits_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_splits):
    root = tmp_path_factory.mktemp("teacher")
    cfg = fast_digits_config(root / "run", root)
    model, meta = train_teacher(cfg, digits_splits)
    return cfg, model, meta


def test_trained_teacher_round_trips_with_its_metadata(trained, digits_splits):
    cfg, model, meta = trained
    assert meta["test_acc"] > 95.0
    assert meta["num_classes"] == 10 and meta["resolution"] == 16 and meta["arch"] == "digits_cnn"
    loaded, loaded_meta = load_teacher(cfg.teacher_checkpoint, "digits_cnn", digits_splits.info)
    assert loaded_meta == meta
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    assert not list(cfg.teacher_checkpoint.parent.glob("*.tmp"))


def test_a_plain_state_dict_from_a_user_loads(tmp_path, digits_splits):
    torch.manual_seed(1)
    model = timm.create_model("digits_cnn", num_classes=10, in_chans=1).eval()
    torch.save(model.state_dict(), tmp_path / "user.pt")
    loaded, meta = load_teacher(tmp_path / "user.pt", "digits_cnn", digits_splits.info)
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))  # the file's weights, not a fresh initialisation
    assert "dataset" not in meta and "test_acc" not in meta  # a bare state dict claims nothing more


def test_a_state_dict_of_another_architecture_is_refused(tmp_path, digits_splits):
    torch.save(timm.create_model("digits_cnn_half", num_classes=10).state_dict(), tmp_path / "half.pt")
    with pytest.raises(ConfigError, match="does not match architecture 'digits_cnn'"):
        load_teacher(tmp_path / "half.pt", "digits_cnn", digits_splits.info)


def test_missing_teacher_says_how_to_get_one(tmp_path, digits_splits):
    with pytest.raises(ConfigError, match="not found: train one with `muse train-teacher"):
        load_teacher(tmp_path / "none.pt", "digits_cnn", digits_splits.info)


def test_corrupt_teacher_is_refused(tmp_path, digits_splits):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_teacher(path, "digits_cnn", digits_splits.info)


def test_pickled_objects_are_not_executed(tmp_path, digits_splits):
    path = tmp_path / "pickled.pt"
    torch.save({"model": timm.create_model("digits_cnn", num_classes=10)}, path)  # a whole module
    with pytest.raises(ConfigError, match="cannot be read"):
        load_teacher(path, "digits_cnn", digits_splits.info)


def test_class_count_and_architecture_mismatches_are_named(trained, tmp_path, digits_splits):
    cfg, model, meta = trained
    save_teacher(tmp_path / "k7.pt", timm.create_model("digits_cnn", num_classes=7), {**meta, "num_classes": 7})
    with pytest.raises(ConfigError, match="it has 7 classes but dataset 'digits' has 10"):
        load_teacher(tmp_path / "k7.pt", "digits_cnn", digits_splits.info)
    with pytest.raises(ConfigError, match="architecture is 'digits_cnn' but teacher.arch is 'lenet5'"):
        load_teacher(cfg.teacher_checkpoint, "lenet5", digits_splits.info)
    save_teacher(tmp_path / "mnist.pt", model, {**meta, "dataset": "mnist"})  # read from the file's metadata
    with pytest.raises(ConfigError, match="it was trained on 'mnist', not 'digits'"):
        load_teacher(tmp_path / "mnist.pt", "digits_cnn", digits_splits.info)


def test_the_same_config_trains_the_same_teacher(tmp_path, digits_splits):
    cfg = fast_digits_config(tmp_path / "run", tmp_path, "teacher.epochs=1")
    first, _ = train_teacher(cfg, digits_splits)
    torch.rand(7)  # whatever ran before in the process must not change the teacher
    second, _ = train_teacher(cfg, digits_splits)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_a_folder_given_as_the_teacher_is_named_as_such(tmp_path, digits_splits):
    with pytest.raises(ConfigError, match="is a folder, not a checkpoint file"):
        load_teacher(tmp_path, "digits_cnn", digits_splits.info)
