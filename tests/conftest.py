"""Shared fixtures: a tiny, fast digits run config and its teacher, trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muse.config import RunConfig, load_config
from muse.data import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Small but real: the same engine and losses, fewer steps. Keeps each end-to-end run to seconds.
FAST_DIGITS = [
    "teacher.epochs=8", "generator.ngf=16", "generator.noise_dim=64", "synthesis.batch_size=50",
    "synthesis.g_steps=10", "synthesis.warmup=2", "synthesis.gwp_loops=3", "synthesis.g_loops=1",
    "distill.epochs=10", "distill.kd_steps=30", "tracking.enabled=false", "distill.batch_size=64",
]


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_splits():
    return load_dataset(load_config("digits").data)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def fast_digits_config(output_dir: Path, teacher_dir: Path, *overrides: str) -> RunConfig:
    return load_config("digits", [*FAST_DIGITS, f"output_dir={output_dir}",
                                  f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}", *overrides])
