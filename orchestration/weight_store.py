"""The student weights, versioned, in one small actor (as RLlib's state server): rank 0 pushes, the
generators pull at the start of each episode when the store holds a newer version.

The store `ray.put`s the weights itself so it owns the object: the pusher can exit, and every puller
fetches the same copy. Each batch carries the version it saw; the consumer logs its staleness and
applies a `StalenessPolicy`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError

if TYPE_CHECKING:  # torch is imported where it is used: the store's own process never needs it
    import torch

NO_VERSION = -1  # the version of "no weights yet"


def state_to_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as CPU numpy arrays: numpy travels through Ray zero-copy, torch tensors are pickled."""
    torch = sys.modules.get("torch")  # a process holding a tensor has imported torch; the store's has not
    out = {}
    for key, value in state.items():
        if torch is not None and isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.dtype == torch.bfloat16 else value  # numpy has no bfloat16
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def numpy_to_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors for `load_state_dict` (copied, so read-only object-store views are fine)."""
    import torch

    return {key: torch.tensor(np.asarray(value)) for key, value in arrays.items()}


class WeightStore:
    """Holds the latest student weights as an ObjectRef it owns. Create it with `create_weight_store`."""

    def __init__(self) -> None:
        self.version = NO_VERSION
        self.ref: ray.ObjectRef | None = None

    def push(self, state: Mapping[str, Any], version: int) -> bool:
        """Keep `state` as version `version` unless the store already holds that version or a newer one.
        Returns whether it was kept."""
        if version <= self.version:
            return False
        self.ref = ray.put(state_to_numpy(state))
        self.version = int(version)
        return True

    def reset(self, state: Mapping[str, Any] | None, version: int) -> None:
        """Hold `state` as `version` whatever the store held: a Train worker group that restarts from a
        checkpoint goes back to an earlier student than the one its lost predecessor pushed (None, with
        NO_VERSION: no student yet)."""
        self.version, self.ref = NO_VERSION, None
        if state is not None:
            self.push(state, version)

    def pull_if_changed(self, version: int) -> tuple[int, ray.ObjectRef | None] | None:
        """`(latest_version, ref)` when the store holds another version than `version` (newer, or older after
        a `reset`), else None; the ref is None when the store holds no student. The caller `ray.get`s the
        ref (a dict of numpy arrays)."""
        if self.version == version:
            return None
        return self.version, self.ref

    def latest_version(self) -> int:
        return self.version


def create_weight_store(name: str | None = None, scheduling_strategy: Any = None,
                        timeout_s: float = 300.0, wait: bool = True) -> ActorHandle:
    """Start a WeightStore actor and (with `wait`) wait until it is up (no CPU reserved; restarted empty
    if it dies, and pullers then keep their current weights until the next push). With a `name` (unique
    per run: several runs may share a cluster), GeneratorActors can find it by name; the name is
    registered before this returns, so they can be started without waiting."""
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    if name is not None:
        options["name"] = name
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    store = ray.remote(WeightStore).options(**options).remote()
    if wait:
        wait_until_store_ready(store, timeout_s)
    return store


def wait_until_store_ready(store: ActorHandle, timeout_s: float = 300.0) -> None:
    try:
        ray.get(store.latest_version.remote(), timeout=timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"the weight store actor did not start within {timeout_s:g} s: is the cluster overloaded, "
                           "or out of memory for a new worker process?") from None


def staleness(current_version: int, batch_version: int) -> int:
    """Student steps between the weights a batch was made with and the current student."""
    lag = current_version - batch_version
    if lag < 0:
        raise ValueError(f"batch version {batch_version} is newer than the current version {current_version}")
    return lag


class StalenessPolicy:
    """Counts batches made with stale student weights and says whether to keep each one.

    A batch made without student weights (`batch_version < 0`: warm-up, or before the first push) did
    not use the student and is never stale.
    """

    def __init__(self, max_staleness: int, on_stale: Literal["use", "drop"] = "use") -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be ≥ 0, got {max_staleness}")
        if on_stale not in ("use", "drop"):
            raise ValueError(f"on_stale must be 'use' or 'drop', got {on_stale!r}")
        self.max_staleness = max_staleness
        self.on_stale = on_stale
        self.seen = self.versioned = self.stale = self.dropped = 0
        self.total_lag = self.max_lag = 0

    @classmethod
    def from_config(cls, cfg: Any) -> StalenessPolicy:
        """From an `RayConfig.weights` section."""
        return cls(cfg.max_staleness, cfg.on_stale)

    def admit(self, current_version: int, batch_version: int) -> bool:
        """Record one batch; False when it is stale and the policy drops stale batches."""
        self.seen += 1
        if batch_version < 0:
            return True
        lag = staleness(current_version, batch_version)
        self.versioned += 1
        self.total_lag += lag
        self.max_lag = max(self.max_lag, lag)
        if lag <= self.max_staleness:
            return True
        self.stale += 1
        if self.on_stale == "drop":
            self.dropped += 1
            return False
        return True

    def metrics(self) -> dict[str, float]:
        return {"batches": self.seen, "stale": self.stale, "dropped": self.dropped,
                "max_staleness": self.max_lag, "mean_staleness": self.total_lag / max(1, self.versioned)}
