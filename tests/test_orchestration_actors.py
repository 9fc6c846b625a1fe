"""The Ray Core layer on a real local cluster: GeneratorActor output, WeightStore versions and
staleness, the pull feed (K calls in flight, nothing lost when an actor is killed), and actor state
round trips. One cluster, one teacher, one WeightStore and two generator actors for the module."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

from muse.embeddings import label_embeddings
from muse.student import StudentNet
from muse.teacher import ensure_teacher
from orchestration import (GenerationFeed, StalenessPolicy, create_generator_actors, create_weight_store,
                           staleness, wait_until_ready)
from orchestration.feed import submit_first_episodes
from orchestration.weight_store import state_to_numpy

from conftest import fast_digits_config

pytestmark = pytest.mark.slow

BATCH = 20  # two noisy layers of the 10 digit classes
FAST_SYNTHESIS = ["synthesis.g_steps=2", f"synthesis.batch_size={BATCH}"]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_splits, teacher_dir):
    """The run config and its student's weights; the driver trains the teacher, the actors load it."""
    cfg = fast_digits_config(tmp_path_factory.mktemp("orchestration"), teacher_dir, *FAST_SYNTHESIS)
    teacher, _ = ensure_teacher(cfg, digits_splits)
    info = digits_splits.info
    embeddings = label_embeddings(cfg.embedding, teacher, info.num_classes, cfg.seed)
    student = StudentNet(cfg.student.arch, info.num_classes, info.in_chans, embeddings.shape[1])
    return cfg, state_to_numpy(student.state_dict())


STORE_NAME = f"test-weights-{os.getpid()}"


@pytest.fixture(scope="module")
def store(cluster):
    return create_weight_store(STORE_NAME)


@pytest.fixture(scope="module")
def actors(cluster, run, store, digits_splits):
    cfg, _ = run
    handles = create_generator_actors(cfg, count=2, num_cpus=0.25, num_gpus=0, weight_store=STORE_NAME,
                                      dataset_info=digits_splits.info)
    wait_until_ready(handles, timeout_s=60)
    return handles


def push_next(store, weights) -> int:
    version = ray.get(store.latest_version.remote()) + 1
    assert ray.get(store.push.remote(weights, version))
    return version


def test_weight_store_keeps_only_newer_versions(store, run):
    _, weights = run
    base = ray.get(store.latest_version.remote())
    assert ray.get(store.push.remote(weights, base + 2))
    assert not ray.get(store.push.remote(weights, base + 1))  # older than held: ignored
    assert ray.get(store.latest_version.remote()) == base + 2
    assert ray.get(store.pull_if_changed.remote(base + 2)) is None
    version, ref = ray.get(store.pull_if_changed.remote(base))  # an ObjectRef nested in the reply
    assert version == base + 2
    pulled = ray.get(ref)
    assert pulled.keys() == weights.keys()
    assert all(np.array_equal(pulled[k], weights[k]) for k in weights)


def test_a_reset_store_goes_back_to_an_older_student(store, run):
    """A Train worker group restarted from a checkpoint resets the store to its restored (older) student;
    a generator holding the lost group's newer one then pulls the older one."""
    _, weights = run
    newest = ray.get(store.latest_version.remote())
    older = {k: v + 1 for k, v in weights.items()}
    ray.get(store.reset.remote(older, newest - 1))
    assert ray.get(store.latest_version.remote()) == newest - 1
    version, ref = ray.get(store.pull_if_changed.remote(newest))
    assert version == newest - 1 and all(np.array_equal(ray.get(ref)[k], older[k]) for k in older)
    ray.get(store.reset.remote(weights, newest))  # the next tests expect the store as it was


def test_generate_returns_the_record_contract_tagged_with_the_student_version(actors, store, run):
    cfg, weights = run
    version = push_next(store, weights)
    out = ray.get(actors[0].generate.remote(0, 7, None, False))
    resolution = out["resolution"]
    assert resolution in cfg.resolution.set
    assert out["images"].shape == (BATCH, 1, resolution, resolution) and out["images"].dtype == np.uint8
    assert out["labels"].shape == (BATCH,) and out["labels"].dtype == np.int64
    assert out["teacher_logits"].shape == (BATCH, 10) and out["teacher_logits"].dtype == np.float32
    assert out["student_version"] == version and out["step"] == 7 and out["actor"] == 0
    assert out["adversarial"] is False and {"bn", "ce", "total"} <= set(out["losses"])
    assert {"synthesis_s", "pull_s", "generate_s"} <= set(out["timings"])

    out = ray.get(actors[0].generate.remote(1, 8, 8, True))  # explicit resolution, student terms on
    assert out["resolution"] == 8 and out["images"].shape[-1] == 8
    assert out["adversarial"] is True and "adv" in out["losses"]

    newer = push_next(store, weights)  # the student moves on after the batch was made
    assert staleness(newer, out["student_version"]) == newer - version == 1
    policy = StalenessPolicy(max_staleness=0, on_stale="drop")
    assert not policy.admit(newer, out["student_version"])
    assert ray.get(actors[0].generate.remote(1, 9, 8, True))["student_version"] == newer
    assert ray.get(actors[0].ping.remote())["student_version"] == newer


def test_feed_keeps_k_calls_in_flight(actors):
    with GenerationFeed(actors, in_flight=3) as feed:
        records = []
        for _ in range(4):
            records.append(feed.next_record(timeout_s=60))
            assert feed.in_flight == 3
        steps = [r.step for r in records]
        assert len(set(steps)) == 4 and set(steps) <= set(range(feed.issued))
        assert all(len(r) == BATCH and r.images.dtype == np.uint8 for r in records)
        assert feed.metrics()["records"] == 4 and feed.wait_s > 0
    assert feed.in_flight == 0


def test_polling_replaces_finished_calls_before_the_trainer_takes_them(actors):
    """One actor runs the K=2 calls one after the other, so they finish apart: each poll sets aside what
    finished and tops the calls in flight up to K while fewer than K finished ones are held."""
    with GenerationFeed(actors[1:], in_flight=2, limit=5).start() as feed:
        deadline = time.monotonic() + 60
        while feed.held < 2 and time.monotonic() < deadline:
            held = feed.poll()
            assert feed.issued == held + feed.in_flight  # nothing taken yet: every episode is held or out
            if held < 2:
                assert feed.in_flight == 2
            time.sleep(0.01)
        assert feed.held == 2 and feed.issued in (2, 3)  # 3 if the first was seen alone; no new call until one is taken
        records = [feed.next_record(timeout_s=60) for _ in range(5)]
        assert [r.step for r in records[:2]] == [0, 1]  # the held ones first, oldest first
        assert sorted(r.step for r in records) == [0, 1, 2, 3, 4] and feed.in_flight == 0 and feed.held == 0


def test_a_feed_with_a_limit_numbers_no_episode_past_it(actors):
    with GenerationFeed(actors, in_flight=3, limit=5) as feed:
        records = [feed.next_record(timeout_s=60) for _ in range(3)]
        assert feed.issued == 5 and feed.in_flight == 2  # the last two went out; nothing past them
        records += [feed.next_record(timeout_s=60) for _ in range(2)]
        assert sorted(r.step for r in records) == [0, 1, 2, 3, 4] and feed.in_flight == 0
        with pytest.raises(RuntimeError, match="all 5 episodes of this feed are taken"):
            feed.next_record(timeout_s=60)


def test_a_feed_adopts_the_first_episodes_the_driver_submitted(actors):
    first, second = submit_first_episodes(actors, world_size=2, per_rank=3, per_epoch=2)
    assert [call.episode for _, call in first] == [0, 2, 4] and [call.episode for _, call in second] == [1, 3, 5]
    assert [call.epoch for _, call in second] == [0, 0, 1]  # two a warm-up epoch: the third is the next epoch's
    assert [ray.get(ref)["epoch"] for ref, _ in second] == [0, 0, 1]  # as the actors were told
    assert not any(call.adversarial for _, call in [*first, *second])
    assert {call.actor for _, call in second} == {0, 1}  # spread over the actors
    with GenerationFeed(actors, in_flight=1, rank=1, world_size=2, limit=4).adopt(second) as feed:
        assert feed.in_flight == 3 and feed.issued == 3
        records = [feed.next_record(timeout_s=60) for _ in range(4)]
        assert sorted(r.step for r in records) == [1, 3, 5, 7]  # the three handed over, then its own next
        assert feed.first_episode_at is not None and feed.first_episode_at <= feed.first_record_at
    with pytest.raises(ValueError, match="not this feed's next"):
        GenerationFeed(actors, in_flight=1, rank=0, world_size=2).adopt(second)
    ray.get([ref for ref, _ in first])


def test_killing_a_generator_mid_call_loses_no_batch(actors):
    pid_before = ray.get(actors[0].ping.remote())["pid"]
    feed = GenerationFeed(actors, in_flight=4)
    records = [feed.next_record(timeout_s=60)]  # the next calls are queued or running on both actors
    ray.kill(actors[0], no_restart=False)
    records += [feed.next_record(timeout_s=60) for _ in range(5)]
    records += feed.drain(timeout_s=60)
    # every episode the feed issued came back exactly once: retried on the restarted actor
    assert sorted(r.step for r in records) == list(range(feed.issued))
    assert feed.actor_failures == 0 and feed.in_flight == 0
    assert ray.get(actors[0].ping.remote())["pid"] != pid_before


def test_state_round_trip_gives_the_same_next_batch(actors):
    apart = ray.get([actor.generate.remote(4, 100, 16, False) for actor in actors])
    assert not np.array_equal(apart[0]["images"], apart[1]["images"])  # seeds differ per actor

    ray.get(actors[1].set_state.remote(ray.get(actors[0].get_state.remote())))
    first, second = ray.get([actor.generate.remote(4, 101, 16, False) for actor in actors])
    assert (first["actor"], second["actor"]) == (0, 1)
    assert np.array_equal(first["images"], second["images"])
    assert np.array_equal(first["teacher_logits"], second["teacher_logits"])


def test_calls_to_a_generator_gone_for_good_go_to_the_others(actors):
    feed = GenerationFeed(actors, in_flight=4)  # two calls on each actor
    records = [feed.next_record(timeout_s=60)]
    ray.kill(actors[0], no_restart=True)  # last test: the module's actor 0 stays dead
    records += [feed.next_record(timeout_s=60) for _ in range(5)]
    records += feed.drain(timeout_s=60)
    assert sorted(r.step for r in records) == list(range(feed.issued))
    assert feed.live_actors == 1 and feed.actor_failures >= 1
