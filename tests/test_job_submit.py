"""`orchestration/run.py` and `sweeps/run.py` as Ray jobs on a head started by the README's own cluster
commands: the repo shipped with `ray job submit --working-dir`, the driver joining the job's cluster (not a
new local one); and a sweep driver on that head interrupted by SIGINT, then continued with --resume.

The README's commands run as written, in bash, with an empty HOME, so that no token or setting left on this
machine can make them pass. The test changes only the ports (free ones, not 6390/8265, which another
cluster may hold) and appends overrides that make the job small; the environment adds a Ray temp folder of
our own and a prompt shutdown. The head must have token authentication on and listen on loopback only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from muse.checkpoint import committed_checkpoints
from muse.config import load_config
from muse.teacher import ensure_teacher

from conftest import FAST_DIGITS, default_sigint, fast_digits_config

BIN = Path(sys.executable).parent
RAY_CLI = BIN / "ray"
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RAY_CLI.is_file(),
                       reason=f"no `ray` CLI next to {sys.executable} (pip install 'ray[default]')"),
]

TINY = ["ray.generators.num_cpus=0.5", "ray.train.cpus_per_worker=0.5", "synthesis.warmup=1",
        "synthesis.gwp_loops=2", "distill.epochs=1", "distill.kd_steps=10"]
# What the upload must leave out (`ray job submit` honours .gitignore too): run outputs, weights, venvs.
EXCLUDES = ["runs/", "*.pt", ".git/", ".venv/", "venv/", "__pycache__/", ".pytest_cache/"]
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell that ran the README's `export RAY_AUTH_MODE=token`, with HOME=`home`: the
    venv's `python` and `ray` first on PATH, and no Ray variable of this machine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"} | extra


def readme_cluster_commands() -> list[str]:
    """The lines of the README's `ray job submit` example, as a user would paste them."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### On a cluster with `ray job submit`"):]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def on_free_ports(line: str, gcs_port: int, dashboard_port: int) -> str:
    """A README line with our ports: the GCS and dashboard ports replaced, and the head's other fixed
    ports (agent, Ray Client) given free ones."""
    for fixed in ("--port=6390", "127.0.0.1:8265"):
        assert fixed not in line or line.count(fixed) == 1, line
    line = line.replace("--port=6390", f"--port={gcs_port}").replace("127.0.0.1:8265", f"127.0.0.1:{dashboard_port}")
    if "ray start --head" in line:
        line += (f" --dashboard-port={dashboard_port} --dashboard-agent-listen-port={free_port()}"
                 f" --ray-client-server-port={free_port()}")
    return line


def listening_addresses(pids: Iterable[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc (no `ss` needed)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # gone meanwhile
            pass
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ip_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(ip_hex)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word little-endian
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def dashboard_get(url: str, token: str | None = None) -> tuple[int, str]:
    """GET from the dashboard, with `Authorization: Bearer <token>` when a token is given: (status, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def session_members(sid: int) -> list[int]:
    """PIDs still in the session `ray start` led (its workers get process groups of their own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


def stop_session(sid: int) -> None:
    """SIGTERM every process of the session we started, SIGKILL what lingers; never the CLI's stop command
    (it stops every Ray cluster on the machine)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


def wait_for_dashboard(url: str, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is serving
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no dashboard at {url} after {timeout_s}s:\n{log.read_text()[-3000:]}")


@dataclass
class Head:
    url: str  # the dashboard (job API)
    gcs_address: str
    home: Path  # the empty HOME the README's commands ran with
    session: int  # the session holding every process of the head
    submit: str  # the README's `ray job submit` line, on our ports

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    """A head started by the README's commands (all but the last, `ray job submit`), in bash, HOME empty."""
    home = tmp_path_factory.mktemp("home")
    log = tmp_path_factory.mktemp("head") / "head.log"
    ray_tmp = tempfile.mkdtemp(prefix="muse-ray-", dir="/tmp")  # short: socket paths
    gcs_port, dashboard_port = free_port(), free_port()
    *setup, submit = [on_free_ports(line, gcs_port, dashboard_port) for line in readme_cluster_commands()]
    assert submit.startswith("ray job submit") and any("ray start --head" in line for line in setup), setup
    env = client_env(
        home,
        # Its ray_current_cluster file (where Ray Train's placement-group cleaner looks for its cluster)
        # stays in a folder of ours, away from other clusters on this machine.
        RAY_TMPDIR=ray_tmp,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops it at once (default: drain 30 s)
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
    )
    env.pop("RAY_AUTH_MODE")  # the README's first line exports it
    with log.open("w") as out:
        shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", "\n".join(setup)], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert shell.wait(timeout=180) == 0, log.read_text()[-3000:]
        url = f"http://127.0.0.1:{dashboard_port}"
        wait_for_dashboard(url, log)
        yield Head(url, f"127.0.0.1:{gcs_port}", home, shell.pid, submit)
    finally:
        stop_session(shell.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_readme_head_has_token_auth_and_listens_on_loopback_only(head):
    token_file = head.home / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600  # made by the README's commands, in the empty HOME
    url, jobs = head.url, f"{head.url}/api/jobs/"
    status, body = dashboard_get(f"{url}/api/authentication_mode")  # public: says whether auth is on
    assert (status, json.loads(body)) == (200, {"authentication_mode": "token"}), body
    assert dashboard_get(jobs)[0] == 401  # no Authorization header
    assert dashboard_get(jobs, secrets.token_hex(32))[0] == 403  # another token
    status, body = dashboard_get(jobs, head.token)
    assert status == 200 and isinstance(json.loads(body), list), body

    listening = listening_addresses(session_members(head.session))
    ports = {port for _, port in listening}
    assert {int(head.gcs_address.rsplit(":", 1)[1]), int(url.rsplit(":", 1)[1])} <= ports, listening
    beyond_loopback = {(ip, port) for ip, port in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")}
    assert not beyond_loopback, f"the head listens beyond loopback: {sorted(beyond_loopback)}"


def test_the_readme_job_succeeds(head, tmp_path, teacher_dir, digits_splits):
    """The README's `ray job submit` line, run in bash from the repo root with the README shell's
    environment (RAY_AUTH_MODE=token, the empty HOME holding the token), plus overrides that make it small."""
    gcs_address = head.gcs_address
    teacher = fast_digits_config(tmp_path, teacher_dir)
    ensure_teacher(teacher, digits_splits)  # trained once here; the job only loads it
    out_dir = tmp_path / "run"
    overrides = [*FAST_DIGITS, *TINY, f"output_dir={out_dir}", f"teacher.checkpoint={teacher.teacher_checkpoint}"]
    job = subprocess.run(["bash", "-c", f"{head.submit} {shlex.join(overrides)}"], cwd=REPO, env=client_env(head.home),
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert re.search(r"Job '\w+' succeeded", output), output[-3000:]

    # The driver joined the head's cluster (RAY_ADDRESS set by the job), it did not start its own.
    assert f"Connecting to existing Ray cluster at address: {gcs_address}" in output, output[-5000:]
    assert "Started a local Ray instance" not in output
    assert "[muse] epoch 2/2 distill" in output and "Reporting training result" not in output  # log_level WARNING
    # The summary table and where the summary went
    assert re.search(r"^student\s+digits_cnn_half\s+top-1 \d+\.\d\d% \(final\)", output, re.MULTILINE), output[-3000:]
    assert re.search(r"^synthesised\s+\d+ images @", output, re.MULTILINE)
    assert f"summary: {out_dir / 'summary.json'}" in output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["kd_steps"] == 10
    assert (out_dir / "student.pt").is_file()


def test_a_sweep_as_a_ray_job(head, tmp_path, teacher_dir, digits_splits):
    url, gcs_address = head.url, head.gcs_address
    teacher = fast_digits_config(tmp_path, teacher_dir)
    ensure_teacher(teacher, digits_splits)
    sweep = tmp_path / "job_sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "config": "digits", "output_dir": str(tmp_path / "sweep"), "search": {"algorithm": "grid"},
        "overrides": [*FAST_DIGITS, *TINY, f"teacher.checkpoint={teacher.teacher_checkpoint}",
                      "ray.generators.num_cpus=0.45", "ray.train.cpus_per_worker=0.45"],  # two trials at once
        "space": {"loss.kr": {"grid": [0.0, 1.0]}}, "max_concurrent_trials": 2}))
    submit = [str(RAY_CLI), "job", "submit", "--address", url, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
              "--", "python", "sweeps/run.py", str(sweep)]
    job = subprocess.run(submit, env=client_env(head.home), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert f"Connecting to existing Ray cluster at address: {gcs_address}" in output, output[-5000:]
    for kr in ("0", "1"):  # the results table: both trials ran to the end
        assert re.search(rf"^trial_\w+ +\| done +\| {kr} +\|", output, re.MULTILINE), output[-3000:]
    assert (tmp_path / "sweep" / "results.csv").read_text().count("\n") == 3
    assert load_config(tmp_path / "sweep" / "best_config.yaml").loss.kr in (0.0, 1.0)


def test_an_interrupted_sweep_continues_with_resume(head, tmp_path, teacher_dir, digits_splits):
    """Ctrl+C stops a sweep mid-trial; the same command plus --resume keeps the finished work, continues
    the unfinished trial from its newest checkpoint and runs the trial not yet started."""
    gcs_address = head.gcs_address
    teacher = fast_digits_config(tmp_path, teacher_dir)
    ensure_teacher(teacher, digits_splits)
    root = tmp_path / "sweep"
    sweep = tmp_path / "resumable.yaml"
    sweep.write_text(yaml.safe_dump({
        "config": "digits", "output_dir": str(root), "search": {"algorithm": "grid"},
        "overrides": [*FAST_DIGITS, "tracking.enabled=true", "distill.epochs=4", "distill.kd_steps=10",
                      "checkpoint_every=1",
                      f"teacher.checkpoint={teacher.teacher_checkpoint}", "ray.generators.num_cpus=0.45",
                      "ray.train.cpus_per_worker=0.45"],
        "space": {"loss.kr": {"grid": [0.0, 1.0]}}, "max_concurrent_trials": 1}))  # one trial after the other
    command = [sys.executable, str(REPO / "sweeps" / "run.py"), str(sweep)]
    env = client_env(head.home, RAY_ADDRESS=gcs_address)

    log = tmp_path / "first.log"
    with log.open("w") as out, default_sigint():
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        # Interrupt once Ray Train has committed the first trial's checkpoint of its second distillation
        # epoch (after 2 warm-up epochs).
        while sum(len(committed_checkpoints(d)) for d in root.glob("trials/*/segment-00")) < 4:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)  # what Ctrl+C sends
        assert first.wait(timeout=120) == 130, log.read_text()[-5000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "continue with the same command plus --resume" in log.read_text()
    [interrupted] = [p.name for p in (root / "trials").iterdir()]
    assert "unfinished" in (root / "results.csv").read_text()
    state = json.loads((root / "sweep_state.json").read_text())
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"

    changed = subprocess.run([*command, "--resume", "loss.bn=0.5"], env=env, capture_output=True, text=True,
                             timeout=JOB_TIMEOUT_S)
    assert changed.returncode == 2 and "the run config differ" in changed.stderr, changed.stderr[-3000:]

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-5000:]
    for kr in ("0", "1"):
        assert re.search(rf"^trial_\w+ +\| done +\| {kr} +\|", output, re.MULTILINE), output[-3000:]
    # The interrupted trial went on from a checkpoint of its first segment, past the epochs it had done.
    segments = [json.loads(line) for line in (root / "trials" / interrupted / "segments.jsonl").read_text().splitlines()]
    assert [s["segment"] for s in segments] == ["segment-00", "segment-01"]
    assert f"{interrupted}/segment-00/checkpoint_" in segments[1]["resumed_from"] and segments[1]["start_epoch"] >= 4
    # One parent run, FINISHED again, with one FINISHED child per trial holding every evaluated epoch.
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "student_acc")}
        assert steps == {3, 4, 5, 6}, child.info.run_name  # warm-up epochs 1-2, then 4 evaluations
    # The table and results.csv take each trial's curve from its summary: every evaluation, including those
    # whose reports to Tune were in flight at the stop.
    summary = json.loads((root / "trials" / interrupted / "segment-01" / "summary.json").read_text())
    with (root / "results.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["trial"] == interrupted)
    assert float(row["final_student_acc"]) == pytest.approx(summary["student_acc"])
    assert float(row["best_student_acc"]) == pytest.approx(max(h["student_acc"] for h in summary["history"]))
    assert row["evaluations"] == "4"
    assert load_config(root / "best_config.yaml").loss.kr in (0.0, 1.0)
