"""What a run leaves in its output_dir when it ends or stops: `summary.json`, `student.pt` and the
resolved `config.yaml`, the same for the single-process engine and the Ray runner."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import yaml

from muse.config import RunConfig
from muse.data import DatasetInfo
from muse.io import atomic_write, save_json, save_torch
from muse.loop import SynthesisTally, spend
from muse.saved_models import STUDENT_FORMAT, classifier_meta

OUTPUT_FILES = ("summary.json", "student.pt", "config.yaml")  # what `save_outputs` writes to output_dir


def build_summary(cfg: RunConfig, *, teacher_acc: float | None, history: list[dict[str, Any]],
                  tally: SynthesisTally, wall_s: float, loop_s: float, kd_steps: int, episodes: int,
                  epochs_done: int) -> dict[str, Any]:
    """The run's summary: final and best accuracy, cost, per-epoch history, config."""
    accs = [h["student_acc"] for h in history]
    return {
        "method": cfg.method, "dataset": cfg.data.name, "teacher": cfg.teacher.arch, "student": cfg.student.arch,
        "teacher_acc": teacher_acc,
        "student_acc": accs[-1] if accs else None,
        "best_acc": max(accs) if accs else None,
        "best_epoch": history[int(np.argmax(accs))]["epoch"] if accs else None,
        "best_note": "best over epochs selects on the test split, as the DFKD literature reports it",
        "wall_s": wall_s, "loop_s": loop_s, "epochs_done": epochs_done, "kd_steps": kd_steps,
        "synthesis_episodes": episodes, "synthesis": tally.as_dict(),
        "budget": {"kind": cfg.budget.kind, "amount": cfg.budget.amount, "spent": spend(tally, cfg.budget.kind)},
        "history": history,
        "config": cfg.model_dump(mode="json"),
    }


def save_outputs(cfg: RunConfig, summary: dict[str, Any], student_state: dict[str, torch.Tensor],
                 info: DatasetInfo) -> None:
    """`student.pt` (the StudentNet state, whose `backbone.*` keys are the plain timm model, and the
    dataset facts that rebuild and feed it), the resolved `config.yaml`, and `summary.json` last: a folder
    with a summary holds the rest."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    save_torch({"format": STUDENT_FORMAT, "arch": cfg.student.arch, "state_dict": student_state,
                "student_acc": summary["student_acc"], "meta": classifier_meta(cfg.student.arch, info)},
               cfg.output_dir / "student.pt")
    atomic_write(cfg.output_dir / "config.yaml",
                 lambda tmp: tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
    save_json(summary, cfg.output_dir / "summary.json")
