import numpy as np
import pyarrow.parquet as pq
import pytest

from muse.pool import SyntheticPool, record_to_table, table_to_record
from muse.synthesis import SynthesisRecord


def record(step, n=4, resolution=8, dtype=np.uint8, classes=3):
    rng = np.random.default_rng(step)
    images = (rng.integers(0, 256, (n, 1, resolution, resolution)).astype(dtype) if dtype == np.uint8
              else rng.random((n, 1, resolution, resolution)).astype(dtype))
    return SynthesisRecord(images=images, labels=np.arange(n) % classes,
                           teacher_logits=rng.standard_normal((n, classes)).astype(np.float32),
                           resolution=resolution, student_version=step * 10, step=step,
                           losses={"bn": 1.5 + step}, timings={"synthesis_s": 0.25})


def assert_same(a, b):
    assert a.images.dtype == b.images.dtype
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.teacher_logits, b.teacher_logits)
    assert (a.resolution, a.student_version, a.step, a.losses, a.timings) == (
        b.resolution, b.student_version, b.step, b.losses, b.timings)


def test_pool_keeps_at_most_capacity_dropping_the_oldest():
    pool = SyntheticPool(capacity=10)
    for step in range(5):
        pool.add(record(step))
    assert len(pool) <= 10
    assert [r.step for r in pool.records] == [3, 4]
    assert pool.total_added == 20


def test_a_record_larger_than_the_pool_keeps_its_newest_rows():
    pool = SyntheticPool(capacity=3)
    big = record(4, n=5, classes=5)  # labels 0..4: one per row
    pool.add(big)
    assert len(pool) == 3 and len(pool.records) == 1
    kept = pool.records[0]
    np.testing.assert_array_equal(kept.labels, [2, 3, 4])
    np.testing.assert_array_equal(kept.images, big.images[2:])
    np.testing.assert_array_equal(kept.teacher_logits, big.teacher_logits[2:])
    assert (kept.step, kept.student_version, kept.resolution) == (4, 40, 8)


def test_sample_draws_one_resolution_at_a_time():
    pool = SyntheticPool(capacity=100)
    pool.add(record(0, resolution=8))
    pool.add(record(1, resolution=16))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        batch = pool.sample(6, rng)
        assert batch.images.shape == (6, 1, batch.resolution, batch.resolution)
        seen.add(batch.resolution)
    assert seen == {8, 16}
    assert pool.sample(3, rng, resolution=16).resolution == 16
    with pytest.raises(ValueError, match="no images at resolution 32"):
        pool.sample(3, rng, resolution=32)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16])
def test_parquet_round_trip_is_lossless(dtype):
    original = record(7, dtype=dtype)
    assert_same(original, table_to_record(record_to_table(original)))


def test_pool_mirrors_to_shards_and_reloads(tmp_path):
    pool = SyntheticPool(capacity=8)
    pool.add(record(0))
    pool.add(record(1, resolution=16))
    pool.save(tmp_path)
    pool.add(record(2))  # drops step 0
    pool.save(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [f"shard-000000001-{pool.run_id}.parquet",
                                                                  f"shard-000000002-{pool.run_id}.parquet"]
    assert not list(tmp_path.glob("*.tmp"))
    loaded = SyntheticPool.load(tmp_path, capacity=8)
    assert len(loaded) == len(pool) and loaded.run_id == pool.run_id  # a resumed run keeps its shard names
    for a, b in zip(pool.records, loaded.records):
        assert_same(a, b)


def test_a_second_run_into_the_same_folder_replaces_the_first_runs_shards(tmp_path):
    """Shard names restart at the same steps in every run: without the run id, the second run would keep
    the first run's shard of step 1 and end with a pool of the first run's images."""
    first, second = SyntheticPool(capacity=8), SyntheticPool(capacity=8)
    first.add(record(1, resolution=16))
    first.save(tmp_path)
    second.add(record(1, resolution=8))
    second.add(record(2, resolution=8))
    second.save(tmp_path)
    loaded = SyntheticPool.load(tmp_path, capacity=8)
    assert [(r.step, r.resolution) for r in loaded.records] == [(1, 8), (2, 8)] and loaded.run_id == second.run_id
    for a, b in zip(second.records, loaded.records):
        assert_same(a, b)


def test_a_pool_written_before_run_ids_still_loads(tmp_path):
    original = record(3)
    pq.write_table(record_to_table(original), tmp_path / "shard-000000003.parquet")
    [loaded] = SyntheticPool.load(tmp_path, capacity=8).records
    assert_same(original, loaded)


def test_sample_records_takes_whole_records_up_to_the_limit():
    pool = SyntheticPool(capacity=100)
    for step in range(10):
        pool.add(record(step))  # 4 images each
    assert pool.sample_records(40, np.random.default_rng(0)) == pool.records  # everything fits
    picked = pool.sample_records(13, np.random.default_rng(0))
    steps = [r.step for r in picked]
    assert len(picked) == 3 and steps == sorted(steps) and len(set(steps)) == 3  # 12 of at most 13 images
    assert steps != [r.step for r in pool.sample_records(13, np.random.default_rng(1))]  # drawn, not the first


def test_latest_by_resolution_is_the_newest_record_of_each():
    pool = SyntheticPool(capacity=100)
    for step, resolution in enumerate([8, 16, 8, 16, 8]):
        pool.add(record(step, resolution=resolution))
    assert {r: rec.step for r, rec in pool.latest_by_resolution().items()} == {8: 4, 16: 3}
