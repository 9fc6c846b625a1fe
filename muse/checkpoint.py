"""One checkpoint format for both runners, written and read only here.

A checkpoint is a folder:
- `state.pt` (rank 0): format, config, epoch, the distiller (student, optimizer, scheduler, RNG, steps),
  one state per generator (the in-process synthesizer's, or each generator actor's), the history of
  evaluations, the teacher's accuracy and the torch RNG;
- `rank<r>.json` (every process): its episodes, synthesis tally, loop seconds, KD-batch RNG and its
  record source's counters (the Ray feed's episode numbering);
- `pool-rank<r>/` (every process): its pool as Parquet shards.

Ray Train commits these folders into a run's output_dir as `checkpoint_<time>/` and names the newest
in its `checkpoint_manager_snapshot.json`; the single-process engine commits them as
`checkpoint_epochNNNN/` (written aside, then renamed) and names the newest in `checkpoint_latest.json`.
`latest_checkpoint` reads either, so `--resume DIR` means the same on both paths.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse.config import ConfigError, RunConfig, error_summary
from muse.distillation import Distiller
from muse.io import save_json
from muse.loop import RunState, SynthesisTally
from muse.pool import SyntheticPool

STATE_FILE = "state.pt"
FORMAT = "muse-run-v1"
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its committed checkpoints
LOCAL_POINTER = "checkpoint_latest.json"  # the single-process engine's
SUMMARY_FILE = "summary.json"


@dataclass
class SavedRun:
    """Rank 0's `state.pt`."""

    config: dict[str, Any]
    epoch: int  # the next epoch to run
    distiller: dict[str, Any]
    generators: list[dict[str, Any]]
    history: list[dict[str, Any]]
    teacher_acc: float | None
    torch_rng: torch.Tensor

    @property
    def kd_steps(self) -> int:
        return int(self.distiller["steps"])

    @property
    def student_state(self) -> dict[str, torch.Tensor]:
        return self.distiller["student"]


def write_checkpoint(directory: Path, rank: int, cfg: RunConfig, state: RunState, distiller: Distiller,
                     pool: SyntheticPool, *, source_state: dict[str, Any],
                     generators: list[dict[str, Any]] | None, teacher_acc: float | None) -> None:
    """Write this process's part of a checkpoint into `directory`; rank 0 also writes `state.pt`
    (then `generators` must be given)."""
    directory = Path(directory)
    pool.save(directory / f"pool-rank{rank}")
    (directory / f"rank{rank}.json").write_text(json.dumps({
        "episodes": state.episodes, "tally": state.tally.as_dict(), "loop_s": state.loop_s,
        "sample_rng": state.sample_rng.bit_generator.state, "source": source_state}))
    if rank == 0:
        if generators is None:
            raise ValueError("rank 0 writes state.pt and needs the generators' states")
        torch.save({"format": FORMAT, "config": cfg.model_dump(mode="json"), "epoch": state.epoch,
                    "distiller": distiller.state_dict(), "generators": generators, "history": state.history,
                    "teacher_acc": teacher_acc, "torch_rng": torch.get_rng_state()}, directory / STATE_FILE)


def read_saved_run(directory: Path) -> SavedRun:
    path = Path(directory) / STATE_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {str(directory)!r} has no {STATE_FILE}: it is not a muse-ray checkpoint "
                          "folder, or it was not written to the end") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # truncated or corrupt
        raise ConfigError(f"{path} cannot be read ({error_summary(error)}): it is truncated or damaged, so the run "
                          "cannot continue from it; start it again with --overwrite, or into a new output_dir") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a muse-ray run checkpoint of format {FORMAT!r} (it says "
                          f"{saved.get('format')!r}); resume it with the muse-ray version that wrote it")
    return SavedRun(saved["config"], int(saved["epoch"]), saved["distiller"], saved["generators"],
                    saved["history"], saved["teacher_acc"], saved["torch_rng"])


def read_ranks(directory: Path) -> dict[int, dict[str, Any]]:
    """Every process's `rank<r>.json`, by rank."""
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text())
            for p in sorted(Path(directory).glob("rank*.json"))}


def restore(directory: Path, rank: int, distiller: Distiller,
            pool: SyntheticPool) -> tuple[RunState, SavedRun, dict[int, dict[str, Any]]]:
    """Load a checkpoint into `distiller` and `pool` (both fresh) and return this process's run state,
    rank 0's saved run (for the generators' states) and every rank's counters. A rank the checkpoint
    does not have (the run now has more workers) starts its own counters afresh."""
    directory = Path(directory)
    saved = read_saved_run(directory)
    ranks = read_ranks(directory)
    distiller.load_state_dict(saved.distiller)
    torch.set_rng_state(saved.torch_rng)
    shards = directory / f"pool-rank{rank}"
    if shards.is_dir():
        loaded = SyntheticPool.load(shards, pool.capacity)
        pool.run_id = loaded.run_id  # a resumed run goes on writing its shards under its own id
        for record in loaded.records:
            pool.add(record)
    state = RunState.fresh(saved.config["seed"], rank)
    state.epoch, state.kd_steps, state.history = saved.epoch, saved.kd_steps, saved.history
    mine = ranks.get(rank)
    if mine is not None:
        state.episodes, state.loop_s = mine["episodes"], mine["loop_s"]
        state.tally = SynthesisTally.from_dict(mine["tally"])
        state.sample_rng = np.random.default_rng()
        state.sample_rng.bit_generator.state = mine["sample_rng"]
    return state, saved, ranks


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint committed in a run's folder: the one Ray Train's snapshot or the engine's
    pointer names, not the newest folder, which may be half-written if the run stopped meanwhile."""
    directory = Path(run_dir).resolve()
    for pointer, keys in ((TRAIN_SNAPSHOT, ("latest_checkpoint_result", "checkpoint_dir_name")),
                          (LOCAL_POINTER, ("checkpoint_dir_name",))):
        try:
            entry: Any = json.loads((directory / pointer).read_text())
            for key in keys:
                entry = entry[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(entry, str) and (directory / entry / STATE_FILE).is_file():
            return directory / entry
    raise ConfigError(f"--resume {str(run_dir)!r}: no committed checkpoint_*/{STATE_FILE} there (named by "
                      f"{TRAIN_SNAPSHOT} or {LOCAL_POINTER}); give the run's output_dir (the folder that holds "
                      "summary.json and the checkpoints)")


def commit_local_checkpoint(run_dir: Path, epoch: int, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint aside with `write(folder)`, rename it to `checkpoint_epochNNNN/`, point
    `checkpoint_latest.json` at it, then remove the checkpoint it replaces: at every moment the
    pointer names a whole checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint_epoch{epoch:04d}"
    pointer = run_dir / LOCAL_POINTER
    previous = json.loads(pointer.read_text())["checkpoint_dir_name"] if pointer.is_file() else None
    if previous == name:
        raise ValueError(f"checkpoint {name} is already committed in {run_dir}")
    scratch = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        write(scratch)
        final = run_dir / name
        if final.exists():  # written before a crash, never committed
            shutil.rmtree(final)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    save_json({"checkpoint_dir_name": name, "epoch": epoch}, pointer)
    if previous is not None:
        shutil.rmtree(run_dir / previous, ignore_errors=True)
    return final


def prepare_output_dir(output_dir: Path, fresh: bool, overwrite: bool = False) -> None:
    """At start-up, before any work: `output_dir` must be a folder this process can write (created if
    missing), and a `fresh` run must not write over an earlier run's outputs (nor, on Ray, silently
    continue it: Ray Train restores a run from the snapshot in its folder), unless `overwrite` deletes them."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir {str(output_dir)!r} cannot be written ({error_summary(error)}): choose a "
                          "folder you can write, e.g. output_dir=runs/NAME") from None
    if fresh and overwrite:
        delete_earlier_run(output_dir)
    elif fresh:
        _refuse_reused(output_dir)
    else:
        set_aside_damaged_snapshot(output_dir)
        remove_uncommitted(output_dir)


def set_aside_damaged_snapshot(run_dir: Path) -> Path | None:
    """Before a resume: Ray Train rewrites its snapshot in place, and a full disk or a kill can leave it
    empty or cut short; Ray Train would then refuse to start in the folder. Rename it to `*.damaged`
    (the run continues from the checkpoint `checkpoint_latest.json` names). Returns the new path."""
    snapshot = Path(run_dir) / TRAIN_SNAPSHOT
    try:
        json.loads(snapshot.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        damaged = snapshot.with_name(snapshot.name + ".damaged")
        snapshot.replace(damaged)
        return damaged
    return None


def committed_checkpoints(run_dir: Path) -> set[str]:
    """The checkpoint folder names committed in a run's folder: those Ray Train's snapshot lists, and the
    one the engine's pointer names (none while a snapshot is being written)."""
    run_dir = Path(run_dir)
    committed: set[str] = set()
    try:
        snapshot = json.loads((run_dir / TRAIN_SNAPSHOT).read_text())
        committed |= {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        committed.add(json.loads((run_dir / LOCAL_POINTER).read_text())["checkpoint_dir_name"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return committed


def remove_uncommitted(run_dir: Path) -> list[Path]:
    """Before a resume: delete the checkpoint folders a stopped or killed process left half-written, those
    neither Ray Train's snapshot nor the engine's pointer names (and the engine's `.checkpoint-*` scratch
    folders). Returns what was deleted."""
    run_dir = Path(run_dir)
    committed = committed_checkpoints(run_dir)
    if not committed:  # nothing to tell committed from uncommitted: leave the folder as it is
        return []
    doomed = sorted(p for p in [*run_dir.glob("checkpoint_*"), *run_dir.glob(".checkpoint-*")]
                    if p.is_dir() and p.name not in committed)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def delete_earlier_run(output_dir: Path) -> list[Path]:
    """Delete what a run leaves in `output_dir` (outputs, checkpoints, pointers, the default pool folder);
    its MLflow runs stay in the store, and nothing else in the folder is touched. Returns what was deleted."""
    from muse.outputs import OUTPUT_FILES

    output_dir = Path(output_dir)
    names = [*OUTPUT_FILES, TRAIN_SNAPSHOT, LOCAL_POINTER, ".validate_storage_marker", "pool"]
    doomed = [output_dir / n for n in names if (output_dir / n).exists()]
    doomed += sorted(p for p in output_dir.glob("checkpoint_*") if p.is_dir())
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return doomed


def _refuse_reused(output_dir: Path) -> None:
    found = [name for name in (TRAIN_SNAPSHOT, LOCAL_POINTER, SUMMARY_FILE) if (Path(output_dir) / name).exists()]
    if found:
        raise ConfigError(f"output_dir {str(output_dir)!r} holds an earlier run ({', '.join(found)}); continue it "
                          "with --resume, start it again with --overwrite (deletes its outputs and checkpoints), "
                          "or give a new output_dir")
