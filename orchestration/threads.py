"""start_thread: work in a daemon thread whose result or error the caller's thread picks up. A module
of its own, importing nothing heavy, for the command line (before torch is loaded) and the runner alike."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def start_thread(name: str, work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """A daemon thread running `work`; the dict gets its `result`, or the `error` it raised (for the
    caller's thread to re-raise)."""
    outcome: dict[str, Any] = {}

    def run_work() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run_work, name=name, daemon=True)
    thread.start()
    return thread, outcome
