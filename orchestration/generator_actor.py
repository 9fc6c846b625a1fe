"""GeneratorActor: one `muse.synthesis.Synthesizer` (teacher, generator, label embeddings, BN EMA) in a
Ray actor, plus a copy of the student it refreshes from the WeightStore before each episode.

The constructor takes small arguments only (the run config as a dict, the actor index, the store's
handle, optionally the dataset's `DatasetInfo` as a dict): Ray restarts a dead actor by re-running
it, and the calls that were in flight are retried on the new one (`max_restarts=-1`,
`max_task_retries=-1`). A restarted actor starts from a fresh generator; `set_state` restores one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from muse.config import RunConfig
from muse.data import DatasetInfo, load_dataset
from muse.embeddings import label_embeddings
from muse.runtime import resolve_device, seed_everything
from muse.schedules import ResolutionSchedule
from muse.student import StudentNet
from muse.synthesis import Synthesizer
from muse.teacher import load_teacher
from orchestration.records import record_to_dict
from orchestration.weight_store import NO_VERSION, numpy_to_state

SEED_STRIDE = 1000  # actor i synthesises with seed cfg.seed + SEED_STRIDE·i


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    """A `DatasetInfo` as a small dict, to pass to actors instead of reloading the dataset in each."""
    return dataclasses.asdict(info)


def info_from_dict(payload: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload.items()})


class GeneratorActor:
    """Synthesis episodes on demand. Usable in-process too (no store: the student is never refreshed).

    Start remote copies with `create_generator_actors`.
    """

    def __init__(self, cfg: dict[str, Any], index: int, weight_store: ActorHandle | str | None = None,
                 dataset_info: dict[str, Any] | None = None) -> None:
        self.cfg = RunConfig.model_validate(cfg)
        self.index = index
        self.seed = self.cfg.seed + SEED_STRIDE * index
        # A name is looked up again on every restart, and keeps object refs out of the constructor's
        # arguments (see `create_generator_actors`).
        self.weight_store = ray.get_actor(weight_store) if isinstance(weight_store, str) else weight_store
        seed_everything(self.seed)
        self.device = resolve_device(self.cfg.device)
        info = info_from_dict(dataset_info) if dataset_info is not None else load_dataset(self.cfg.data).info
        # The driver trains the teacher before starting actors; an actor only loads it (and fails with
        # the checkpoint's path when it is missing), so N actors never train N teachers.
        teacher, _ = load_teacher(self.cfg.teacher_checkpoint, self.cfg.teacher.arch, info)
        # Same embeddings (and student shape) in every actor and in the Train workers: the run's seed.
        embeddings = label_embeddings(self.cfg.embedding, teacher, info.num_classes, self.cfg.seed)
        self.student = StudentNet(self.cfg.student.arch, info.num_classes, info.in_chans,
                                  embeddings.shape[1]).to(self.device)
        self.student_version = NO_VERSION
        self.synthesizer = Synthesizer(self.cfg.model_copy(update={"seed": self.seed}), teacher, embeddings,
                                       info.in_chans, info.mean, info.std, info.resolution, self.device)
        # The run's seed, so a global episode number maps to the same resolution in every actor.
        total_epochs = self.cfg.synthesis.warmup + self.cfg.distill.epochs
        self.schedule = ResolutionSchedule(self.cfg.resolution, total_epochs, self.cfg.seed)
        self.epoch: int | None = None  # last epoch seen; None: fresh generator, nothing to rebuild
        self.ready_at = time.time()

    def generate(self, epoch: int, episode: int, resolution: int | None = None,
                 adversarial: bool = False) -> dict[str, Any]:
        """One synthesis episode for global episode number `episode` of `epoch`, at `resolution` (None:
        the resolution schedule's choice). Pulls newer student weights first; the adversarial terms are
        on only with `adversarial` and once the actor holds student weights.

        Returns `record_to_dict` of the `SynthesisRecord` (its `step` is `episode`, unique across
        actors) plus `actor`, `epoch`, `episode`, `adversarial` (whether the student was used) and
        `actor_step` (this actor's episode counter) and `started_at` (time.time() the call began); timings
        add `pull_s` and `generate_s`.
        """
        started, started_at = time.perf_counter(), time.time()
        self.maybe_rebuild(epoch)
        pull_s = self._pull_weights()
        if resolution is None:
            resolution = self.schedule.resolution(epoch, episode)
        elif resolution not in self.cfg.resolution.set:
            raise ValueError(f"resolution {resolution} is not in resolution.set {self.cfg.resolution.set}")
        student = self.student if self.student_version != NO_VERSION else None
        use_student = adversarial and student is not None
        record = self.synthesizer.episode(resolution, student, self.student_version, adversarial=use_student)
        record.step = episode
        record.timings |= {"pull_s": pull_s, "generate_s": time.perf_counter() - started}
        return record_to_dict(record, actor=self.index, epoch=epoch, episode=episode, adversarial=use_student,
                              actor_step=self.synthesizer.step, started_at=started_at)

    def _pull_weights(self) -> float:
        """Load the store's student weights when they are not ours (newer, or older after a Train restart);
        returns the seconds spent. When the store (or the object it owned) is lost, keep the current
        weights: staleness logs will show it."""
        if self.weight_store is None:
            return 0.0
        started = time.perf_counter()
        try:
            changed = ray.get(self.weight_store.pull_if_changed.remote(self.student_version))
            if changed is not None:
                version, ref = changed
                if ref is not None:
                    self.student.load_state_dict(numpy_to_state(ray.get(ref)))
                self.student_version = version  # NO_VERSION: no student, the episode is not adversarial
        except (RayActorError, ObjectLostError) as error:
            print(f"GeneratorActor {self.index}: keeping student version {self.student_version}; "
                  f"weight pull failed ({type(error).__name__})")
        return time.perf_counter() - started

    def maybe_rebuild(self, epoch: int) -> bool:
        """Rebuild the generator when a `g_life` boundary lies in (last epoch seen, `epoch`]: calls
        arrive out of order across actors, so an actor may skip the boundary epoch itself."""
        previous = self.epoch
        if previous is not None and epoch <= previous:
            return False
        self.epoch = epoch
        if previous is None:
            return False
        life = self.cfg.synthesis.g_life
        boundary = epoch - epoch % life
        return boundary > previous and self.synthesizer.maybe_rebuild(boundary)

    def get_state(self) -> dict[str, Any]:
        """What a resume needs: `Synthesizer.snapshot` (generator, BN EMA, RNGs, step, last epoch seen)."""
        return self.synthesizer.snapshot(self.epoch, self.index)

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch = self.synthesizer.load_snapshot(state)

    def ping(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "student_version": self.student_version,
                "step": self.synthesizer.step, "device": str(self.device), "ready_at": self.ready_at}


def create_generator_actors(cfg: RunConfig, count: int, num_cpus: float, num_gpus: float = 0.0,
                            weight_store: ActorHandle | str | None = None, dataset_info: DatasetInfo | None = None,
                            scheduling_strategy: Any = None, first_index: int = 0,
                            resources: dict[str, float] | None = None) -> list[ActorHandle]:
    """Start `count` restartable GeneratorActors with indices first_index, first_index+1, ….

    The teacher checkpoint must exist (train it in the driver first). Pass the `DatasetInfo` to spare
    each actor loading the dataset. Give the WeightStore by name (`create_weight_store(name)`) rather
    than by handle: an actor handle carries an object ref, and for a restartable actor with one in its
    constructor arguments Ray 2.60 logs an error (ray-project/ray#53727, once per process) that the
    restart may fail if that object is lost. By name, nothing can be lost. Inside a Tune trial, give `scheduling_strategy="DEFAULT"` unless the
    trial's placement group reserves the actors' bundles.
    """
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": -1,
                               "max_task_retries": -1}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    if resources:
        options["resources"] = dict(resources)
    remote_class = ray.remote(GeneratorActor).options(**options)
    payload = cfg.model_dump(mode="json")
    info = info_to_dict(dataset_info) if dataset_info is not None else None
    return [remote_class.remote(payload, first_index + i, weight_store, info) for i in range(count)]


def wait_until_ready(actors: list[ActorHandle], timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Block until every actor is constructed; a constructor error (e.g. a missing teacher) raises here.
    Generous: on a loaded machine importing torch and building the teacher can take minutes."""
    try:
        return ray.get([actor.ping.remote() for actor in actors], timeout=timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"the {len(actors)} generator actors did not start within {timeout_s:g} s: the cluster may "
                           "lack the resources they ask for (ray.generators.count × num_cpus / num_gpus), or be "
                           "overloaded") from None
