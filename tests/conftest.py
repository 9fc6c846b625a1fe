"""Shared fixtures: a tiny, fast digits run config and its teacher, trained once per test session."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from collections.abc import Iterator

from pathlib import Path

import pytest
import ray
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


@pytest.fixture(scope="session", autouse=True)
def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty HOME for the whole session, as on a machine that never ran these tests: a Ray token
    (~/.ray/auth_token), MLflow, torch or matplotlib caches left here make no test pass or fail, and no
    test writes to the real HOME. Session-scoped and autouse: set up before any module's Ray cluster, and
    inherited by every process a test starts. (Imports at collection come earlier: .ci/run covers them.)"""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(home))
        # These lead past HOME to this machine's own folders or Ray token.
        for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "TORCH_HOME", "HF_HOME",
                     "MPLCONFIGDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.delenv(name, raising=False)
        yield home


@pytest.fixture(scope="session")
def digits_splits():
    return load_dataset(load_config("digits").data)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def fast_digits_config(output_dir: Path, teacher_dir: Path, *overrides: str) -> RunConfig:
    return load_config("digits", [*FAST_DIGITS, f"output_dir={output_dir}",
                                  f"teacher.checkpoint={teacher_dir / 'digits_cnn.pt'}", *overrides])


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """Processes started in this block handle SIGINT as Python does by default. A SIGINT ignored by
    whatever started the tests (e.g. a shell's `pytest &`) is ignored by every child too, and a child
    Python then never raises KeyboardInterrupt; handlers, unlike an ignored signal, are not inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def train_ready_cluster(num_cpus: int) -> Iterator[None]:
    """A local Ray cluster, on loopback, that Ray Train and Tune runs work on."""
    # A RAY_TMPDIR of our own (short: socket paths). Ray Train's placement-group cleaner finds its
    # cluster through $RAY_TMPDIR/ray/ray_current_cluster (without it, through the machine's only GCS
    # process): in the default /tmp, another cluster on this machine could be taken for ours, and our
    # Train placement group removed mid-run.
    ray_tmp = tempfile.mkdtemp(prefix="muse-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_TMPDIR", ray_tmp)  # inherited by the raylet and every worker it starts
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one process less per run
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice a finished run sooner
        # Loopback only: without these Ray swaps 127.0.0.1 for the machine's IP and listens on every
        # interface (the variable for the processes Ray starts, the constant for this one).
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1")
        try:
            (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
            yield
        finally:  # a failing test must not leave Ray up for the next module's cluster
            ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


