"""GenerationFeed: how a Train worker gets synthetic batches. Pull, not push, and no queue actor.

The worker keeps K `generate.remote()` calls in flight over the GeneratorActors and takes whichever
finishes first (`ray.wait(num_returns=1)`), submitting a replacement at once. Between takes (KD steps,
evaluation, a checkpoint) the worker `poll`s: a call that has finished is set aside and replaced at once,
so no actor waits for the trainer to come back for its batch. The worker owns every result ref, so
nothing is lost when a generator dies: Ray restarts the actor and retries the call
(`max_task_retries=-1`); a call to an actor that is gone for good is resubmitted to a live one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from muse.synthesis import SynthesisRecord
from orchestration.records import record_from_dict


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


@dataclass
class _Call:
    epoch: int
    episode: int
    adversarial: bool
    actor: int = -1  # position in the feed's actor list


class GenerationFeed:
    """K `generate` calls in flight over `actors`; `next_record` returns the first to finish, or the oldest
    that `poll` set aside (up to K finished batches are held, so at most 2K episodes are out at once).

    Episode numbers are global across Train workers: worker `rank` of `world_size` issues episodes
    start_episode + rank, start_episode + rank + world_size, … so pool shards and resolution schedules
    never collide. `set_phase` applies to calls submitted after it; `drain` first to apply it to all.
    With `limit` the feed numbers no more than that many episodes: where the run's need is known, no
    generator works on an episode nobody will take (at the end of a run, or before a stop epoch).
    """

    def __init__(self, actors: list[ActorHandle], in_flight: int, *, rank: int = 0, world_size: int = 1,
                 start_episode: int = 0, epoch: int = 0, adversarial: bool = False,
                 resolution: int | None = None, copy_arrays: bool = False, limit: int | None = None) -> None:
        if not actors:
            raise ValueError("a GenerationFeed needs at least one generator actor")
        if in_flight < 1:
            raise ValueError(f"in_flight must be ≥ 1, got {in_flight}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be ≥ 0, got {limit}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.actors = list(actors)
        self.in_flight_target = in_flight
        self.rank, self.world_size, self.start_episode = rank, world_size, start_episode
        self.epoch, self.adversarial = epoch, adversarial
        self.resolution = resolution  # None: each actor follows the resolution schedule
        self.copy_arrays = copy_arrays
        self.issued = 0  # episodes numbered so far by this feed
        self.limit = limit
        self._pending: dict[ray.ObjectRef, _Call] = {}
        self._finished: deque[tuple[ray.ObjectRef, _Call]] = deque()  # set aside by `poll`, oldest first
        self._retry: deque[_Call] = deque()
        self._load = [0] * len(self.actors)
        self._dead: set[int] = set()
        self._cursor = rank % len(self.actors)  # ranks start on different actors
        self.records = 0
        self.wait_s = 0.0  # time blocked in ray.wait: the feed's overhead as seen by the trainer
        self.first_record_at: float | None = None  # time.time() of the first batch back (start-up's end)
        self.first_episode_at: float | None = None  # time.time() an actor began the earliest episode got back
        self.actor_failures = 0
        self.last_error: BaseException | None = None

    @property
    def in_flight(self) -> int:
        """Calls queued or running on the actors."""
        return len(self._pending)

    @property
    def held(self) -> int:
        """Finished calls that `poll` set aside, not yet taken."""
        return len(self._finished)

    @property
    def exhausted(self) -> bool:
        """Every episode the limit allows is numbered (in flight or taken)."""
        return self.limit is not None and self.issued >= self.limit

    @property
    def live_actors(self) -> int:
        return len(self.actors) - len(self._dead)

    def start(self) -> GenerationFeed:
        """Submit the first K calls now (otherwise the first `next_record` does)."""
        self._fill(new_calls=True)
        return self

    def hand_over(self) -> list[tuple[ray.ObjectRef, _Call]]:
        """The calls in flight, for another feed to `adopt` (e.g. in another process); this feed lets go of them."""
        calls = [*self._finished, *self._pending.items()]
        self._pending.clear()
        self._finished.clear()
        self._load = [0] * len(self.actors)
        return calls

    def adopt(self, calls: list[tuple[ray.ObjectRef, _Call]]) -> GenerationFeed:
        """Take over calls that another feed of the same rank, actors and numbering submitted (`hand_over`)
        as this feed's first episodes, before it submits any of its own."""
        if self.issued:
            raise ValueError("adopt calls before the feed submits its own")
        for ref, call in calls:
            expected = self._new_call().episode
            if call.episode != expected:
                raise ValueError(f"handed-over episode {call.episode} is not this feed's next ({expected}): "
                                 "a different rank, world size or start episode")
            self._pending[ref] = call
            self._load[call.actor] += 1
        return self

    def set_phase(self, epoch: int, adversarial: bool) -> None:
        """The epoch and adversarial flag for calls submitted from now on."""
        self.epoch, self.adversarial = epoch, adversarial

    def poll(self) -> int:
        """Without blocking: set aside the calls that have finished and submit a replacement for each
        at once (while fewer than K are held). Returns how many finished calls are held."""
        if self._pending:
            done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            for ref in done:
                self._finished.append((ref, self._take(ref)))
            if done:
                self._fill(new_calls=True)
        return len(self._finished)

    def next_record(self, timeout_s: float | None = None) -> SynthesisRecord:
        """The first finished batch (topping the calls in flight back up to K). Raises TimeoutError when
        none finishes within `timeout_s`, RuntimeError when no actor is left, and re-raises a
        `RayTaskError` from inside `generate` (a bug, not a lost actor)."""
        record = self._next(_deadline(timeout_s), replace=True)
        assert record is not None
        return record

    def drain(self, timeout_s: float | None = None) -> list[SynthesisRecord]:
        """Collect every call in flight without submitting new episodes (e.g. before a phase change or
        a checkpoint). Calls lost with their actor are still resubmitted to a live one."""
        deadline, records = _deadline(timeout_s), []
        while (record := self._next(deadline, replace=False)) is not None:
            records.append(record)
        return records

    def _next(self, deadline: float | None, replace: bool) -> SynthesisRecord | None:
        """Wait for one call; None when nothing is left to wait for (only with `replace=False`)."""
        while True:
            taken = self._finished.popleft() if self._finished else self._wait_for_one(deadline, replace)
            if taken is None:
                return None
            ref, call = taken
            try:
                payload = ray.get(ref)
            except RayActorError as error:
                if isinstance(error, RayTaskError):  # raised inside generate: a bug, not a lost actor
                    raise
                self._lost(call, error)
                continue
            if replace:
                self._fill(new_calls=True)
            if (began := payload.get("started_at")) is not None:
                self.first_episode_at = min(self.first_episode_at or began, began)
            self.records += 1
            self.first_record_at = self.first_record_at or time.time()
            return record_from_dict(payload, copy=self.copy_arrays)

    def _wait_for_one(self, deadline: float | None, replace: bool) -> tuple[ray.ObjectRef, _Call] | None:
        """The first call in flight to finish (topped up first); None when nothing is left to wait for
        (only with `replace=False`)."""
        self._fill(new_calls=replace)
        if not self._pending:
            if replace and self.exhausted and not self._retry:
                raise RuntimeError(f"all {self.limit} episodes of this feed are taken; none is left to wait for")
            if self._retry or replace:
                raise RuntimeError(f"no live generator actors left (of {len(self.actors)})") from self.last_error
            return None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        started = time.perf_counter()
        ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=remaining)
        self.wait_s += time.perf_counter() - started
        if not ready:
            raise TimeoutError(f"no synthetic batch came back in time ({self.in_flight} calls in flight)")
        return ready[0], self._take(ready[0])

    def close(self, grace_s: float = 5.0) -> None:
        """Cancel the queued calls and let running ones finish (up to `grace_s`); results are discarded.
        Ray cannot interrupt a running method of a sync actor, and leaving it be keeps the actor's
        synthesizer state whole."""
        refs = list(self._pending)
        for ref in refs:
            ray.cancel(ref, recursive=False)  # not the store pull the call may be making
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        self._pending.clear()
        self._finished.clear()
        self._retry.clear()
        self._load = [0] * len(self.actors)

    def metrics(self) -> dict[str, float]:
        return {"records": self.records, "wait_s": self.wait_s, "mean_wait_s": self.wait_s / max(1, self.records),
                "in_flight": self.in_flight, "held": self.held, "live_actors": self.live_actors,
                "actor_failures": self.actor_failures}

    def __enter__(self) -> GenerationFeed:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def _fill(self, new_calls: bool = True) -> None:
        """Resubmit lost calls, then (with `new_calls`, and while fewer than K finished calls are held) add
        new episodes, up to K calls in flight."""
        while len(self._pending) < self.in_flight_target and self.live_actors > 0:
            if not self._retry and (not new_calls or self.exhausted or len(self._finished) >= self.in_flight_target):
                return
            call = self._retry.popleft() if self._retry else self._new_call()
            call.actor = self._choose_actor()
            ref = self.actors[call.actor].generate.remote(call.epoch, call.episode, self.resolution,
                                                          call.adversarial)
            self._pending[ref] = call
            self._load[call.actor] += 1

    def _new_call(self) -> _Call:
        episode = self.start_episode + self.issued * self.world_size + self.rank
        self.issued += 1
        return _Call(self.epoch, episode, self.adversarial)

    def _choose_actor(self) -> int:
        """Round-robin over live actors, skipping ahead to the least loaded (a restarting actor)."""
        order = [(self._cursor + k) % len(self.actors) for k in range(len(self.actors))]
        best = min((i for i in order if i not in self._dead), key=lambda i: self._load[i])
        self._cursor = (best + 1) % len(self.actors)
        return best

    def _take(self, ref: ray.ObjectRef) -> _Call:
        call = self._pending.pop(ref)
        self._load[call.actor] -= 1
        return call

    def _lost(self, call: _Call, error: RayActorError) -> None:
        """The actor is gone (restarts exhausted, killed for good, or its constructor failed) or briefly
        unreachable: resubmit the same episode, to another actor if this one is dead."""
        self.actor_failures += 1
        self.last_error = error
        if not isinstance(error, ActorUnavailableError):
            self._dead.add(call.actor)
        self._retry.append(call)


def submit_first_episodes(actors: list[ActorHandle], world_size: int, per_rank: int,
                          per_epoch: int) -> list[list[tuple[ray.ObjectRef, _Call]]]:
    """A fresh run's first `per_rank` episodes of each of `world_size` Train ranks (warm-up episodes, each
    warm-up epoch `per_epoch` of them per rank), submitted now: they need no student, so the driver can
    start them as soon as the actors exist, before the Train workers are up. Numbered, and given the
    epoch, as each rank's loop would; rank r's feed `adopt`s list r."""
    ranks: list[list[tuple[ray.ObjectRef, _Call]]] = []
    for rank in range(world_size):
        feed, calls = GenerationFeed(actors, 1, rank=rank, world_size=world_size, limit=per_rank), []
        for k in range(per_rank):
            feed.set_phase(k // per_epoch, adversarial=False)
            calls += feed.start().hand_over()
        ranks.append(calls)
    return ranks
