"""A run's student and a teacher outside the run: `muse evaluate` on the run's split and on an ImageFolder of
PNGs, and `muse export` to timm, safetensors and TorchScript files that load back to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from muse.cli import main
from muse.config import load_config
from muse.data import load_dataset
from muse.engine import run_distillation
from muse.export import load_run_student
from muse.teacher import train_teacher

from conftest import fast_digits_config

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}  # one class per colour


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_splits, teacher_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    run_distillation(fast_digits_config(out, teacher_dir, "distill.epochs=3"), digits_splits, progress=False)
    return out


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 20×20 RGB PNGs: train/ and val/, one folder per colour, noisy pixels."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 10)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_evaluate_prints_the_runs_own_final_accuracy(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["evaluate", "--checkpoint", str(run_dir / "student.pt")]) == 0  # the run's config.yaml
    out = capsys.readouterr().out
    assert f"student digits_cnn_half on digits test (360 images, 16 px): top-1 {summary['student_acc']:.2f}%" in out
    assert "top-5" in out


def test_evaluate_a_teacher_on_an_imagefolder_of_pngs(png_folder, tmp_path, capsys):
    overrides = ["data.name=imagefolder", f"data.root={png_folder}", "data.resolution=16", "teacher.epochs=4",
                 "teacher.arch=digits_cnn", f"teacher.checkpoint={tmp_path / 'teacher.pt'}"]
    cfg = load_config("digits", overrides)
    _, meta = train_teacher(cfg, load_dataset(cfg.data))
    assert meta["class_names"] == sorted(COLOURS) and meta["in_chans"] == 3

    assert main(["evaluate", "--checkpoint", str(tmp_path / "teacher.pt"), "--config", "digits", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"teacher digits_cnn on imagefolder test (30 images, 16 px): top-1 {meta['test_acc']:.2f}%" in out
    assert meta["test_acc"] > 90  # colours are easy: the PNGs were read, resized and normalised as in training
    assert "top-5" not in out  # 3 classes


def test_evaluate_refuses_a_checkpoint_for_another_dataset(run_dir, png_folder, capsys):
    code = main(["evaluate", "--checkpoint", str(run_dir / "student.pt"), "--config", "digits",
                 "data.name=imagefolder", f"data.root={png_folder}", "data.resolution=16"])
    assert code == 2
    assert "it has 10 classes but dataset 'imagefolder' has 3" in capsys.readouterr().err


def test_timm_export_loads_with_plain_timm_in_a_fresh_process(run_dir, tmp_path, capsys):
    assert main(["export", "--run", str(run_dir), "--format", "timm"]) == 0
    path = run_dir / "export" / "digits_cnn_half.pth"
    assert f"→ {path}" in capsys.readouterr().out
    x = torch.randn(5, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, timm, torch\n"
        "import muse.models  # registers digits_cnn_half with timm\n"
        f"model = timm.create_model('digits_cnn_half', pretrained=True, in_chans=1, num_classes=10,\n"
        f"    pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes=10)).eval()\n"
        f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    expected = load_run_student(run_dir).model(x)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_safetensors_and_torchscript_exports_round_trip(run_dir):
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = load_run_student(run_dir).model(x)
        assert main(["export", "--run", str(run_dir), "--format", "safetensors"]) == 0
        folder = run_dir / "export" / "digits_cnn_half"
        assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
        hub_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(hub_model(x), expected, rtol=0, atol=0)
        assert hub_model.pretrained_cfg["mean"] == pytest.approx([0.3053833942240780])  # digits normalisation

        assert main(["export", "--run", str(run_dir), "--format", "torchscript"]) == 0
        scripted = torch.jit.load(str(run_dir / "export" / "digits_cnn_half.torchscript.pt")).eval()
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)


def test_export_needs_a_finished_run(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "timm"]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err
