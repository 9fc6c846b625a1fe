"""RunInterrupted, which every command line catches, in a module that imports nothing heavy: a command
line can then parse its arguments and start a cluster before torch and the models are loaded."""

from __future__ import annotations

from typing import Any


class RunInterrupted(Exception):
    """Ctrl+C stopped a run. `summary` is marked `interrupted` and saved with the student, as of the run's
    last evaluation (in-process) or last committed checkpoint (Ray); None when nothing was committed yet."""

    def __init__(self, summary: dict[str, Any] | None) -> None:
        super().__init__("interrupted" + (f" after epoch {summary['epochs_done']}" if summary else ""))
        self.summary = summary
