"""`muse pool show|export`: counts of a known pool, and exports that reload with the same images, labels
and counts (torchvision's ImageFolder; the Hugging Face Parquet layout)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from muse.cli import main
from muse.pool import SyntheticPool
from muse.synthesis import SynthesisRecord

# (resolution, labels) per record: 3 classes, two resolutions
RECORDS = [(8, [0, 1, 2, 0]), (16, [1, 1, 2]), (8, [2, 0])]


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    pool = SyntheticPool(capacity=100)
    for step, (resolution, labels) in enumerate(RECORDS):
        n = len(labels)
        pool.add(SynthesisRecord(images=rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8),
                                 labels=np.array(labels), teacher_logits=rng.normal(size=(n, 3)).astype(np.float32),
                                 resolution=resolution, step=step))
    pool.save(tmp_path / "run" / "pool")
    return tmp_path / "run", pool


def _expected_counts() -> dict[str, int]:
    labels = [label for _, labels in RECORDS for label in labels]
    return {str(c): labels.count(c) for c in range(3)}


def test_pool_show_counts_per_resolution_and_class(run_dir, capsys):
    assert main(["pool", "show", str(run_dir[0])]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 9 images, 1,152 pixels" in out  # 6 × 64 + 3 × 256
    assert "8 px:        6 images" in out and "16 px:        3 images" in out
    assert "per class: 0 3, 1 3, 2 3" in out


def test_imagefolder_export_reloads_with_the_same_counts_and_pixels(run_dir, tmp_path):
    root, pool = run_dir
    assert main(["pool", "export", str(root), "--format", "imagefolder", "--out", str(tmp_path / "png")]) == 0
    folder = ImageFolder(str(tmp_path / "png"))
    assert folder.classes == ["0", "1", "2"]
    counts = {name: sum(1 for _, t in folder.samples if t == i) for i, name in enumerate(folder.classes)}
    assert counts == _expected_counts()
    first = pool.records[0]  # 8 px, label 0, row 0
    png = np.array(Image.open(tmp_path / "png" / "0" / "8px-000000000-00000.png"))
    np.testing.assert_array_equal(png, first.images[0, 0])


def test_parquet_export_is_the_hugging_face_layout(run_dir, tmp_path):
    root, pool = run_dir
    out = tmp_path / "hf"
    assert main(["pool", "export", str(root), "--format", "parquet", "--out", str(out)]) == 0
    table = pq.read_table(out / "data" / "train-00000.parquet")
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["label"] == {"names": ["0", "1", "2"], "_type": "ClassLabel"}
    assert table.column("label").to_pylist() == [label for _, labels in RECORDS for label in labels]
    second = pool.records[1]  # the 16 px record starts at row 4
    png = np.array(Image.open(io.BytesIO(table.column("image")[4].as_py()["bytes"])))
    np.testing.assert_array_equal(png, second.images[0, 0])
    np.testing.assert_allclose(table.column("teacher_logits")[4].as_py(), second.teacher_logits[0])

    datasets = pytest.importorskip("datasets")  # not a test dependency; checked when installed
    loaded = datasets.load_dataset(str(out), split="train")
    assert loaded.features["label"].names == ["0", "1", "2"] and loaded[4]["image"].size == (16, 16)


def test_export_refuses_an_existing_folder_and_a_folder_without_a_pool(run_dir, tmp_path, capsys):
    assert main(["pool", "export", str(run_dir[0]), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pool", "show", str(tmp_path / "nothing")]) == 2
    assert "holds no pool" in capsys.readouterr().err
