"""Joining a cluster that is not there: `python orchestration/run.py` with RAY_ADDRESS naming a closed port
or a port where something listens but never answers as a Ray head ends with one line and exit 2 within
`ray.connect_timeout_s`, instead of Ray's minutes of "Failed to connect to GCS"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse.config import ConfigError
from orchestration.cluster import host_port

REPO = Path(__file__).resolve().parents[1]


def run_py(tmp_path: Path, address: str, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "orchestration/run.py", "--no-tracking", f"output_dir={tmp_path / 'run'}",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def test_a_closed_port_is_refused_at_once(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        done, _ = run_py(tmp_path, address)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot reach the Ray cluster at '{address}' (Connection refused); start one with `ray start "
        "--head`, fix ray.address / RAY_ADDRESS, or unset it to run on a local cluster")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_a_silent_listener_stops_the_run_within_the_timeout(tmp_path):
    with socket.socket() as listener:  # accepts connections (the kernel does), never speaks
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        done, seconds = run_py(tmp_path, address, "ray.connect_timeout_s=4")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the Ray cluster at '{address}' did not answer within 4 s (ray.connect_timeout_s); start one "
        "with `ray start --head`, fix ray.address / RAY_ADDRESS, or unset it to run on a local cluster")
    assert seconds < 4 + 40  # the timeout plus starting Python, torch and Ray on a loaded 2-core machine


def test_addresses_are_parsed_for_the_probe():
    assert host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert host_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_port("auto") is None
    with pytest.raises(ConfigError, match="has no valid port"):
        host_port("127.0.0.1:http")
