"""A bounded pool of synthetic batches (records), oldest dropped first, mirrored to Parquet shards.

NAYER keeps every image forever as PNG files; we keep at most `capacity` images in memory and write
each record as one Parquet shard (one row per image; the record's resolution, step, student version
and losses in the file's metadata), so a pool survives a restart and reloads bit for bit. Shard names
carry the pool's run id, so a folder never mixes the shards of two runs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse.io import atomic_write
from muse.synthesis import SynthesisRecord

SHARD_PATTERN = "shard-{step:09d}-{run_id}.parquet"
RUN_ID_IN_NAME = re.compile(r"^shard-\d+-(?P<run_id>[0-9a-f]+)\.parquet$")  # older pools: shard-<step>.parquet


@dataclass
class PoolBatch:
    """Images of one resolution drawn from the pool."""

    images: np.ndarray
    labels: np.ndarray
    teacher_logits: np.ndarray
    resolution: int


class SyntheticPool:
    def __init__(self, capacity: int, run_id: str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.records: list[SynthesisRecord] = []
        self.total_added = 0

    def __len__(self) -> int:
        return sum(len(r) for r in self.records)

    def add(self, record: SynthesisRecord) -> None:
        """Add a record, then drop the oldest records (or the oldest rows of the newest one) beyond capacity."""
        if len(record) > self.capacity:
            keep = slice(len(record) - self.capacity, None)
            record = SynthesisRecord(record.images[keep], record.labels[keep], record.teacher_logits[keep],
                                     record.resolution, record.student_version, record.step, record.losses,
                                     record.timings)
        self.records.append(record)
        self.total_added += len(record)
        while len(self) > self.capacity:
            self.records.pop(0)

    def counts(self) -> dict[int, int]:
        """Images held per resolution."""
        counts: dict[int, int] = {}
        for record in self.records:
            counts[record.resolution] = counts.get(record.resolution, 0) + len(record)
        return dict(sorted(counts.items()))

    def latest_by_resolution(self) -> dict[int, SynthesisRecord]:
        """The newest record of each resolution held, by resolution."""
        latest = {record.resolution: record for record in self.records}
        return dict(sorted(latest.items()))

    def sample_records(self, max_images: int, rng: np.random.Generator) -> list[SynthesisRecord]:
        """Whole records holding at most `max_images` images (all of them when they fit), drawn uniformly
        without replacement, in pool order."""
        if len(self) <= max_images:
            return list(self.records)
        chosen, count = [], 0
        for index in rng.permutation(len(self.records)).tolist():
            if count + len(self.records[index]) <= max_images:
                chosen.append(index)
                count += len(self.records[index])
        return [self.records[i] for i in sorted(chosen)]

    def sample(self, batch_size: int, rng: np.random.Generator, resolution: int | None = None) -> PoolBatch:
        """Uniform sample (with replacement when the group is smaller) from one resolution's images.
        With `resolution=None` the resolution is drawn in proportion to how many images each holds."""
        counts = self.counts()
        if not counts:
            raise ValueError("the pool is empty: synthesise at least one batch first")
        if resolution is None:
            sizes = np.array(list(counts.values()), dtype=np.float64)
            resolution = int(rng.choice(list(counts), p=sizes / sizes.sum()))
        group = [r for r in self.records if r.resolution == resolution]
        if not group:
            raise ValueError(f"the pool holds no images at resolution {resolution} (it has {list(counts)})")
        offsets = np.cumsum([0] + [len(r) for r in group])
        picks = rng.choice(offsets[-1], size=batch_size, replace=batch_size > offsets[-1])
        which = np.searchsorted(offsets, picks, side="right") - 1
        rows = picks - offsets[which]
        return PoolBatch(
            images=np.stack([group[w].images[i] for w, i in zip(which, rows)]),
            labels=np.array([group[w].labels[i] for w, i in zip(which, rows)], dtype=np.int64),
            teacher_logits=np.stack([group[w].teacher_logits[i] for w, i in zip(which, rows)]),
            resolution=resolution,
        )

    def sample_mixed(self, batch_size: int, rng: np.random.Generator) -> list[PoolBatch]:
        """Uniform sample over all images, returned as one batch per resolution present in the draw
        (for students that see every image resized to one size: a batch mixes resolutions)."""
        counts = self.counts()
        if not counts:
            raise ValueError("the pool is empty: synthesise at least one batch first")
        sizes = np.array(list(counts.values()))
        draws = rng.multinomial(batch_size, sizes / sizes.sum())
        return [self.sample(int(n), rng, resolution) for resolution, n in zip(counts, draws) if n > 0]

    def save(self, directory: Path) -> list[Path]:
        """Mirror the pool to `directory`: write shards of new records, remove every other shard (of dropped
        records, or of another run)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {SHARD_PATTERN.format(step=r.step, run_id=self.run_id): r for r in self.records}
        for name, record in wanted.items():
            path = directory / name
            if not path.exists():
                table = record_to_table(record)
                atomic_write(path, lambda tmp, t=table: pq.write_table(t, tmp))
        for stale in directory.glob("shard-*.parquet"):
            if stale.name not in wanted:
                stale.unlink()
        return [directory / name for name in wanted]

    @classmethod
    def load(cls, directory: Path, capacity: int) -> SyntheticPool:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"pool directory {str(directory)!r} does not exist")
        run_ids = {m["run_id"] for path in directory.glob("shard-*.parquet") if (m := RUN_ID_IN_NAME.match(path.name))}
        pool = cls(capacity, run_ids.pop() if len(run_ids) == 1 else None)
        for record in read_shards(directory):
            pool.add(record)
        return pool


def read_shards(directory: Path) -> Iterator[SynthesisRecord]:
    """The records of a pool folder's shards, oldest first, read one shard at a time."""
    for path in sorted(Path(directory).glob("shard-*.parquet")):
        yield table_to_record(pq.read_table(path))


def record_to_table(record: SynthesisRecord) -> pa.Table:
    n, channels, height, width = record.images.shape
    images = pa.FixedSizeListArray.from_arrays(pa.array(record.images.reshape(-1)), channels * height * width)
    logits = pa.FixedSizeListArray.from_arrays(pa.array(record.teacher_logits.reshape(-1)),
                                               record.teacher_logits.shape[1])
    metadata = {
        "resolution": record.resolution, "channels": channels, "height": height, "width": width,
        "student_version": record.student_version, "step": record.step,
        "image_dtype": str(record.images.dtype), "losses": record.losses, "timings": record.timings,
    }
    table = pa.table({"image": images, "label": pa.array(record.labels), "teacher_logits": logits})
    return table.replace_schema_metadata({"muse": json.dumps(metadata)})


def table_to_record(table: pa.Table) -> SynthesisRecord:
    meta = json.loads(table.schema.metadata[b"muse"])
    shape = (table.num_rows, meta["channels"], meta["height"], meta["width"])
    images = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    logits = table.column("teacher_logits").combine_chunks()
    return SynthesisRecord(
        images=images.astype(meta["image_dtype"]).reshape(shape),
        labels=table.column("label").to_numpy().astype(np.int64),
        teacher_logits=logits.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, logits.type.list_size),
        resolution=meta["resolution"],
        student_version=meta["student_version"],
        step=meta["step"],
        losses=meta["losses"],
        timings=meta["timings"],
    )
