from collections import Counter

import pytest

from muse.config import ResolutionConfig
from muse.schedules import ResolutionSchedule


def schedule(kind, resolutions=(8, 12, 16), weights=None, epochs=6):
    cfg = ResolutionConfig(set=list(resolutions), schedule=kind, weights=weights)
    return ResolutionSchedule(cfg, total_epochs=epochs, seed=3)


def test_fixed_uses_the_first_resolution():
    s = schedule("fixed", resolutions=(16,))
    assert {s.resolution(e, i) for e in range(3) for i in range(5)} == {16}


def test_cycle_walks_the_set_episode_by_episode():
    s = schedule("cycle")
    assert [s.resolution(0, i) for i in range(7)] == [8, 12, 16, 8, 12, 16, 8]


def test_random_is_reproducible_and_follows_the_weights():
    s = schedule("random", weights=[0.0, 1.0, 3.0])
    draws = [s.resolution(0, i) for i in range(2000)]
    assert draws == [s.resolution(0, i) for i in range(2000)]
    counts = Counter(draws)
    assert counts[8] == 0
    assert counts[16] / counts[12] == pytest.approx(3.0, rel=0.15)


def test_progressive_moves_from_low_to_high():
    s = schedule("progressive", epochs=6)
    assert [s.resolution(e, 0) for e in range(6)] == [8, 8, 12, 12, 16, 16]
