"""Screenshots of a finished run in the MLflow UI, taken by headless Chromium, for the README.

    python docs/screenshots.py runs/digits            # writes docs/mlflow-runs.png, docs/mlflow-run.png,
                                                      # docs/mlflow-artifacts.png, docs/digits-resolutions.png

Serves the run's own sqlite store with `mlflow server` on a free loopback port, opens the experiment
(the runs table), the run and its artifact view, and copies the run's last side-by-side picture of
every resolution. Needs Chromium (`apt-get install chromium`); it runs offline, with its background
networking off.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow server at {url} did not answer within {timeout_s:.0f} s")


def screenshot(chromium: str, url: str, out: Path, size: str = "1400,900") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run's output_dir, tracked to its own mlflow.db")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    store = f"sqlite:///{(args.run / 'mlflow.db').resolve()}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("muse")
    if experiment is None:
        raise SystemExit(f"{args.run} has no 'muse' experiment in {store}: run with tracking on")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health")
        page = f"{base}/#/experiments/{experiment.experiment_id}"
        ml = "?workflowType=machine_learning"  # the UI defaults to its GenAI views
        screenshot(args.chromium, page + ml, DOCS / "mlflow-runs.png")
        screenshot(args.chromium, f"{page}/runs/{run.info.run_id}{ml}", DOCS / "mlflow-run.png")
        pictures = sorted(p.path for p in client.list_artifacts(run.info.run_id, "resolutions"))
        shown = f"/{pictures[-1]}" if pictures else ""
        screenshot(args.chromium, f"{page}/runs/{run.info.run_id}/artifacts{shown}{ml}", DOCS / "mlflow-artifacts.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    if pictures:
        local = client.download_artifacts(run.info.run_id, pictures[-1], tempfile.mkdtemp())
        shutil.copyfile(local, DOCS / "digits-resolutions.png")
        print(f"wrote {DOCS / 'digits-resolutions.png'} (from {pictures[-1]})")


if __name__ == "__main__":
    main()
