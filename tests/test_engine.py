"""End to end, in one process: a short real run distils a student far above the noise floor."""

import json

import numpy as np
import pytest
import torch

from muse.engine import build_run, run_distillation
from muse.pool import SyntheticPool

from conftest import fast_digits_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_splits):
    root = tmp_path_factory.mktemp("engine")
    muse = run_distillation(fast_digits_config(root / "muse", root), digits_splits, progress=False)
    noise = run_distillation(fast_digits_config(root / "noise", root, "method=nayer", "synthesis.source=noise"),
                             digits_splits, progress=False)
    return root, muse, noise


def test_distilled_student_beats_the_noise_floor_by_a_wide_margin(runs):
    _, muse, noise = runs
    assert muse["teacher_acc"] > 95
    assert muse["student_acc"] > 70
    assert muse["student_acc"] - noise["student_acc"] > 40


def test_summary_accounts_images_and_pixels_per_resolution(runs):
    root, muse, _ = runs
    on_disk = json.loads((root / "muse" / "summary.json").read_text())
    assert on_disk["student_acc"] == muse["student_acc"]
    images = muse["synthesis"]["images"]
    assert set(images) == {"8", "16"}  # the digits MUSE default synthesises at both resolutions
    assert sum(images.values()) == muse["synthesis_episodes"] * 50
    assert muse["synthesis"]["total_pixels"] == sum(int(r) ** 2 * n for r, n in images.items())
    assert len(muse["history"]) == 10 and muse["kd_steps"] == 10 * 30
    assert muse["best_acc"] == max(h["student_acc"] for h in muse["history"])


def test_run_leaves_a_loadable_student_and_pool(runs):
    root, muse, _ = runs
    state = torch.load(root / "muse" / "student.pt", weights_only=True)
    assert state["arch"] == "digits_cnn_half"
    pool = SyntheticPool.load(root / "muse" / "pool", capacity=10**6)
    assert len(pool) == muse["synthesis"]["total_images"]


def test_episode_record_contract(tmp_path, digits_splits, teacher_dir):
    parts = build_run(fast_digits_config(tmp_path, teacher_dir), digits_splits)
    for resolution in (8, 16):
        record = parts.synthesizer.episode(resolution, parts.student, student_version=3, adversarial=True)
        assert record.images.shape == (50, 1, resolution, resolution) and record.images.dtype == np.uint8
        assert record.labels.shape == (50,) and record.teacher_logits.shape == (50, 10)
        assert record.student_version == 3 and record.resolution == resolution
        assert {"bn", "ce", "kr", "adv", "aed", "total"} <= set(record.losses)
        assert record.timings["synthesis_s"] > 0
    assert parts.synthesizer.step == 2


def test_generator_loss_falls_within_an_episode(tmp_path, digits_splits, teacher_dir):
    cfg = fast_digits_config(tmp_path, teacher_dir, "synthesis.g_steps=1")
    first = build_run(cfg, digits_splits).synthesizer.episode(16).losses["total"]
    cfg = fast_digits_config(tmp_path, teacher_dir, "synthesis.g_steps=25")
    best = build_run(cfg, digits_splits).synthesizer.episode(16).losses["total"]
    assert best < 0.7 * first


def test_distillation_step_fits_a_fixed_mixed_resolution_batch(tmp_path, digits_splits, teacher_dir):
    parts = build_run(fast_digits_config(tmp_path, teacher_dir, "distill.augment=false", "distill.lr=0.1",
                                         "distill.lr_schedule=constant"), digits_splits)
    for resolution in (8, 16):
        parts.pool.add(parts.synthesizer.episode(resolution))
    batches = parts.pool.sample_mixed(64, np.random.default_rng(0))
    assert sorted(b.resolution for b in batches) == [8, 16]
    first = parts.distiller.step(batches)
    for _ in range(60):
        last = parts.distiller.step(batches)
    assert last["kd"] < 0.5 * first["kd"]
    assert parts.distiller.steps == 61


def test_bn_recalibration_sets_the_students_statistics_to_those_of_the_pool(tmp_path, digits_splits, teacher_dir):
    parts = build_run(fast_digits_config(tmp_path, teacher_dir), digits_splits)
    for resolution in (8, 16, 8):
        parts.pool.add(parts.synthesizer.episode(resolution))
    for _ in range(5):  # running statistics as training leaves them: not the pool's
        parts.distiller.step(parts.pool.sample_mixed(64, np.random.default_rng(0)))
    first_conv, first_bn = parts.student.backbone.features[0][0], parts.student.backbone.features[0][1]
    inputs = [parts.distiller.student_input(r.images) for r in parts.pool.records]
    with torch.no_grad():
        per_batch = [first_conv(x) for x in inputs]
    pool_mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in per_batch]).mean(dim=0)  # equal-size batches
    pool_var = torch.stack([a.transpose(0, 1).flatten(1).var(dim=1) for a in per_batch]).mean(dim=0)
    assert not torch.allclose(first_bn.running_mean, pool_mean, atol=1e-3)

    parts.distiller.recalibrate_bn(parts.pool.records)
    assert torch.allclose(first_bn.running_mean, pool_mean, atol=1e-5)
    assert torch.allclose(first_bn.running_var, pool_var, rtol=1e-4)
    assert first_bn.momentum == 0.1 and parts.student.training  # left as training needs it
