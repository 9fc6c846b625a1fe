"""`muse pool show|export`: look at a run's synthetic pool and hand it to other tools.

A pool folder holds one Parquet shard per synthesis record (`muse.pool`). `summarize_pool` counts
images per resolution and class; `export_imagefolder` writes PNGs in torchvision's ImageFolder layout
(`<out>/<class>/<resolution>px-<step>-<row>.png`); `export_hf_parquet` writes the Hugging Face `datasets`
Parquet layout (`<out>/data/train-*.parquet`, `image` as {bytes, path} PNG structs, `label` as a
ClassLabel declared in the schema's `huggingface` metadata), which `datasets.load_dataset("parquet",
data_dir=...)` and `load_dataset(<out>)` read with decoded images and class names. Shards are read one
at a time, so a pool larger than memory exports too.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from muse.config import ConfigError
from muse.pool import read_shards

EXPORT_FORMATS = ("imagefolder", "parquet")
_ROWS_PER_FILE = 10_000  # Parquet files of the HF layout; datasets reads them as one split


def pool_directory(path: Path) -> Path:
    """The shard folder for a run folder (its `pool/`) or a pool folder itself."""
    path = Path(path)
    for candidate in (path / "pool", path):
        if candidate.is_dir() and any(candidate.glob("shard-*.parquet")):
            return candidate
    raise ConfigError(f"{str(path)!r} holds no pool: give a run's output_dir or its pool folder "
                      "(Parquet shard-*.parquet files)")


def class_names(path: Path, num_classes: int) -> list[str]:
    """Class names from the run's `student.pt` when it records them, else zero-padded indices (so that
    sorting the names, as ImageFolder does, keeps the label order)."""
    for student in (Path(path) / "student.pt", Path(path).parent / "student.pt"):
        if student.is_file():
            names = torch.load(student, map_location="cpu", weights_only=True).get("meta", {}).get("class_names")
            if names and len(names) >= num_classes and sorted(names) == list(names):
                return list(names)
    width = len(str(max(num_classes - 1, 0)))
    return [f"{index:0{width}d}" for index in range(num_classes)]


def summarize_pool(path: Path) -> dict[str, Any]:
    """Shards, images and pixels per resolution, and images per class, of a pool."""
    directory = pool_directory(path)
    per_resolution: Counter[int] = Counter()
    per_class: Counter[int] = Counter()
    shards = 0
    num_classes = 0
    for record in read_shards(directory):
        shards += 1
        per_resolution[record.resolution] += len(record)
        per_class.update(record.labels.tolist())
        num_classes = max(num_classes, record.teacher_logits.shape[1])
    names = class_names(path, num_classes)
    return {
        "directory": str(directory), "shards": shards, "images": sum(per_resolution.values()),
        "pixels": sum(r * r * n for r, n in per_resolution.items()),
        "images_per_resolution": dict(sorted(per_resolution.items())),
        "images_per_class": {names[c]: per_class.get(c, 0) for c in range(num_classes)},
    }


def format_pool_summary(summary: dict[str, Any]) -> str:
    lines = [f"pool {summary['directory']}: {summary['shards']} shards, {summary['images']:,} images, "
             f"{summary['pixels']:,} pixels"]
    lines += [f"  {r:>4} px: {n:>8,} images" for r, n in summary["images_per_resolution"].items()]
    lines.append("  per class: " + ", ".join(f"{name} {n:,}" for name, n in summary["images_per_class"].items()))
    return "\n".join(lines)


def export_pool(path: Path, fmt: str, out: Path) -> dict[str, int]:
    """Export a pool as `fmt` into the new folder `out` (refused if it exists); returns images per class.
    The folder appears complete or not at all (written beside it, then renamed)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown pool export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    directory, out = pool_directory(path), Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists: give a new folder for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write = _write_imagefolder if fmt == "imagefolder" else _write_hf_parquet
        counts = write(directory, class_names(path, _num_classes(directory)), staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _rows(directory: Path) -> Iterator[tuple[np.ndarray, int, np.ndarray, int, str]]:
    """(HWC uint8 image, label, teacher logits, resolution, file name) for every image of the pool."""
    for record in read_shards(directory):
        images = record.images
        if images.dtype != np.uint8:  # float16 pools hold [0, 1] pixels
            images = np.clip(np.rint(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        for row in range(len(record)):
            name = f"{record.resolution}px-{record.step:09d}-{row:05d}.png"
            yield images[row].transpose(1, 2, 0), int(record.labels[row]), record.teacher_logits[row], record.resolution, name


def _png(image_hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc)


def _num_classes(directory: Path) -> int:
    first = next(read_shards(directory))
    return first.teacher_logits.shape[1]


def _write_imagefolder(directory: Path, names: list[str], out: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for image, label, _, _, file_name in _rows(directory):
        folder = out / names[label]
        folder.mkdir(exist_ok=True)
        _png(image).save(folder / file_name)
        counts[names[label]] += 1
    return dict(counts)


def _write_hf_parquet(directory: Path, names: list[str], out: Path) -> dict[str, int]:
    features = {
        "image": {"_type": "Image"},
        "label": {"names": names, "_type": "ClassLabel"},
        "resolution": {"dtype": "int32", "_type": "Value"},
        "teacher_logits": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
    }
    schema = pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()), ("resolution", pa.int32()), ("teacher_logits", pa.list_(pa.float32())),
    ], metadata={"huggingface": json.dumps({"info": {"features": features}})})
    (out / "data").mkdir()
    counts: Counter[str] = Counter()
    batch: list[dict[str, Any]] = []
    files = 0

    def flush() -> None:
        nonlocal files
        pq.write_table(pa.Table.from_pylist(batch, schema=schema), out / "data" / f"train-{files:05d}.parquet")
        files += 1
        batch.clear()

    for image, label, logits, resolution, file_name in _rows(directory):
        buffer = io.BytesIO()
        _png(image).save(buffer, format="PNG")
        batch.append({"image": {"bytes": buffer.getvalue(), "path": file_name}, "label": label,
                      "resolution": resolution, "teacher_logits": logits.astype(np.float32).tolist()})
        counts[names[label]] += 1
        if len(batch) == _ROWS_PER_FILE:
            flush()
    if batch:
        flush()
    return dict(counts)
