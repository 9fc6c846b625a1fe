"""Joining the Ray cluster a run names, or starting a local one, within a bounded time.

Ray retries a GCS that does not answer for minutes (printing "Failed to connect to GCS" every ~40 s)
and `ray.init` takes no timeout for joining. So an address is first probed with a plain TCP connection
(refused or silent: a clear error at once, or after `ray.connect_timeout_s`), and the join itself runs
under a watchdog that ends the process with one line when it outlasts that timeout (something listens
there, but not a Ray head). Nothing of the run exists yet at that point: no cluster of ours, no MLflow run.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import ray

from muse.config import ConfigError, RunConfig

JOIN_FIX = ("start one with `ray start --head`, fix ray.address / RAY_ADDRESS, or unset it to run on a "
            "local cluster")


def connect(cfg: RunConfig, num_cpus: int | None) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS, else start a local one. True if we started it."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        join(address, cfg.ray.connect_timeout_s)
        return False
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls; loopback only.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")
    return True


def join(address: str, timeout_s: float) -> None:
    """`ray.init(address)`, or a ConfigError (exit 2) naming the address when it cannot be reached."""
    started = time.monotonic()
    if (endpoint := host_port(address)) is not None:
        probe(address, *endpoint, timeout_s)
    left_s = max(1.0, timeout_s - (time.monotonic() - started))
    with exit_if_slower_than(left_s, f"error: the Ray cluster at {address!r} did not answer within "
                                        f"{timeout_s:g} s (ray.connect_timeout_s); {JOIN_FIX}"):
        try:
            ray.init(address=address)
        except ConnectionError as error:
            raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({error}); {JOIN_FIX}") from None


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto` and other forms Ray resolves."""
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:  # a port that is not a number
        raise ConfigError(f"ray.address / RAY_ADDRESS {address!r} has no valid port; write host:port, "
                          "e.g. 127.0.0.1:6379") from None
    if parsed.hostname is None or port is None:
        return None
    return parsed.hostname, port


def probe(address: str, host: str, port: int, timeout_s: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except TimeoutError:
        raise ConfigError(f"the Ray cluster at {address!r} did not answer within {timeout_s:g} s "
                          f"(ray.connect_timeout_s); {JOIN_FIX}") from None
    except OSError as error:  # refused, unknown host, unreachable network
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({error.strerror or error}); "
                          f"{JOIN_FIX}") from None


@contextmanager
def exit_if_slower_than(timeout_s: float, message: str) -> Iterator[None]:
    """Run the block; if it is still running after `timeout_s`, print `message` and end the process with 2.
    Only for blocks that nothing needs cleaning up after (see the module docstring)."""
    def give_up() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
