"""CommitPointer, a Ray Train callback. A module of its own: the Train controller process unpickles it,
and `orchestration.runner` would bring the method's models (timm) into that process with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train
from ray.train import UserCallback

from muse.io import save_json


class CommitPointer(UserCallback):
    """In the Train controller: after each checkpoint Ray Train commits, point `pointer` (the run's
    `checkpoint_latest.json`) at it, written atomically. Ray Train rewrites its own snapshot in place,
    so a full disk can leave it empty; the pointer then still names the last whole checkpoint, and
    `--resume` continues from it."""

    def __init__(self, pointer: Path) -> None:
        self.pointer = Path(pointer)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is not None:
            save_json({"checkpoint_dir_name": Path(checkpoint.path).name, "epoch": metrics[0].get("epoch")},
                      self.pointer)
