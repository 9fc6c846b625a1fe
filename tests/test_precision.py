"""bf16 autocast and channels_last (`synthesis.*`, `distill.*`, `teacher.*`): same shapes, finite
losses, fp32 state, a layout change that does not change values, and a teacher that still learns."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from muse.config import ComputeOptions, ConfigError, load_config
from muse.engine import build_run
from muse.teacher import train_supervised
from tests.conftest import fast_digits_config

BOTH = ["synthesis.precision=bf16", "synthesis.channels_last=true", "distill.precision=bf16",
        "distill.channels_last=true"]


def test_options_are_validated_with_the_choices_named():
    assert load_config("digits", ["distill.precision=bf16"]).distill.precision == "bf16"
    with pytest.raises(ConfigError, match="bf16"):
        load_config("digits", ["synthesis.precision=fp16"])


def test_bf16_channels_last_episode_and_step_keep_shapes_finite_losses_and_fp32_state(
        tmp_path, digits_splits, teacher_dir):
    parts = build_run(fast_digits_config(tmp_path, teacher_dir, *BOTH), digits_splits)
    assert parts.synthesizer.precision.autocast and parts.distiller.precision.channels_last
    for resolution in (8, 16):
        record = parts.synthesizer.episode(resolution, parts.student, student_version=0, adversarial=True)
        assert record.images.shape == (50, 1, resolution, resolution) and record.images.dtype == np.uint8
        assert record.teacher_logits.dtype == np.float32 and np.isfinite(record.teacher_logits).all()
        assert {"bn", "ce", "kr", "adv", "aed", "total"} <= set(record.losses)
        assert all(np.isfinite(value) for value in record.losses.values())
        parts.pool.add(record)
    conv = parts.student.backbone.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    before = conv.detach().clone()
    losses = parts.distiller.step(parts.pool.sample_mixed(64, np.random.default_rng(0)))
    assert np.isfinite(losses["kd"]) and np.isfinite(losses["ed"]) and losses["kd"] > 0
    assert all(p.dtype == torch.float32 for p in parts.student.parameters())
    assert not torch.equal(before, conv.detach())


def test_bf16_losses_stay_close_to_fp32_on_the_same_batch(tmp_path, digits_splits, teacher_dir):
    losses = {}
    for name, options in (("fp32", []), ("bf16", ["distill.precision=bf16"])):
        parts = build_run(fast_digits_config(tmp_path, teacher_dir, "distill.augment=false", *options), digits_splits)
        torch.manual_seed(0)
        for resolution in (8, 16):
            parts.pool.add(parts.synthesizer.episode(resolution))
        losses[name] = parts.distiller.step(parts.pool.sample_mixed(64, np.random.default_rng(0)))
    for term in ("kd", "ed"):
        assert losses["bf16"][term] == pytest.approx(losses["fp32"][term], rel=0.05)
    # autocast really ran in bf16: some term moved (which one depends on the CPU's bf16 kernels; on a
    # CPU without AVX512-BF16 this step's KD term came out bit-identical and only ED moved)
    assert losses["bf16"] != losses["fp32"]


def test_channels_last_changes_layout_not_values(tmp_path, digits_splits, teacher_dir):
    # One generator step: the kept images are the untrained generator's, so both runs score the same
    # batch (after optimiser steps, float rounding differences in the kernels would compound).
    results, shared_batch = {}, None
    for name, options in (("nchw", []), ("nhwc", ["synthesis.channels_last=true", "distill.channels_last=true"])):
        parts = build_run(fast_digits_config(tmp_path, teacher_dir, "distill.augment=false", "synthesis.g_steps=1",
                                             *options), digits_splits)
        record = parts.synthesizer.episode(16)
        parts.pool.add(record)
        shared_batch = shared_batch or parts.pool.sample(64, np.random.default_rng(0))
        results[name] = (record, parts.distiller.step(shared_batch))
    (a, step_a), (b, step_b) = results["nchw"], results["nhwc"]
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1  # uint8 rounding of equal floats
    np.testing.assert_allclose(a.teacher_logits, b.teacher_logits, rtol=1e-4, atol=1e-4)
    assert step_a["kd"] == pytest.approx(step_b["kd"], rel=1e-4)


def test_teacher_cache_key_changes_only_when_a_compute_option_is_set():
    default = load_config("digits").teacher_checkpoint
    assert load_config("digits", ["teacher.precision=fp32", "teacher.channels_last=false"]).teacher_checkpoint == default
    assert load_config("digits", ["teacher.precision=bf16"]).teacher_checkpoint != default
    assert load_config("digits", ["teacher.channels_last=true"]).teacher_checkpoint != default


def test_teacher_training_in_bf16_channels_last_learns_like_fp32(digits_splits):
    accuracy = {}
    for name, compute in (("fp32", ComputeOptions()), ("bf16", ComputeOptions(precision="bf16", channels_last=True))):
        torch.manual_seed(0)
        model = timm.create_model("digits_cnn_half", num_classes=10, in_chans=1)
        accuracy[name] = train_supervised(model, digits_splits, 10, 64, 0.1, 5e-4, 0, compute=compute)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert accuracy["fp32"] > 90 and abs(accuracy["bf16"] - accuracy["fp32"]) < 3
