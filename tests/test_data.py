"""Tests for muse.data: digits (always), small fakes in tmp_path, and the real MNIST/CIFAR-10 when present."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from muse import data as muse_data
from muse.config import ConfigError, DataConfig, load_config
from muse.data import (
    DatasetError,
    ImageSplits,
    denormalize,
    iterate_batches,
    load_dataset,
    normalize,
)
from muse.datasets import DatasetSpec, dataset_names, get_dataset
from muse.transforms import resize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared(folder: str) -> Path:
    path = SHARED_DATA / folder
    if not (path / "train.npz").is_file() or not (path / "test.npz").is_file():
        pytest.skip(f"real dataset not available at {path}")
    return path


@pytest.fixture(scope="module")
def digits() -> ImageSplits:
    return load_dataset(DataConfig())


def _stack(split, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for xb, yb in iterate_batches(split, 512):
        images.append(xb)
        labels.append(yb)
        if count is not None and sum(len(x) for x in images) >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


# --- digits --------------------------------------------------------------------------------------


def test_digits_shapes_classes_and_sizes(digits: ImageSplits) -> None:
    info = digits.info
    assert (info.name, info.num_classes, info.in_chans, info.resolution) == ("digits", 10, 1, 16)
    assert info.class_names == tuple(str(c) for c in range(10))
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    image, label = digits.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10


def test_digits_split_is_stratified(digits: ImageSplits) -> None:
    train = np.bincount(digits.train.labels.numpy(), minlength=10)
    test = np.bincount(digits.test.labels.numpy(), minlength=10)
    assert train.sum() == 1437 and test.sum() == 360
    assert np.all(np.abs(test - 0.2 * (train + test)) <= 1)


def test_digits_are_deterministic(digits: ImageSplits) -> None:
    again = load_dataset(DataConfig(name="digits"))
    x1, y1 = _stack(digits.test)
    x2, y2 = _stack(again.test)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(digits.train.labels, again.train.labels)


def test_digits_constants_match_the_train_split() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, _, _, _ = train_test_split(
        bunch.images / 16.0, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0
    )
    spec = get_dataset("digits")
    assert spec.mean[0] == pytest.approx(x_train.mean(), abs=1e-9)
    assert spec.std[0] == pytest.approx(x_train.std(), abs=1e-9)


def test_loaded_digits_follow_the_registry(digits: ImageSplits) -> None:
    spec, info = get_dataset("digits"), digits.info
    assert (info.mean, info.std, info.in_chans) == (spec.mean, spec.std, spec.channels)
    assert (info.num_classes, info.resolution) == (spec.num_classes, spec.native_resolution)
    # What the split yields is normalised with exactly these constants.
    raw = digits.test.images[:4]
    stacked = torch.stack([digits.test[i][0] for i in range(4)])
    expected = (raw - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    assert torch.allclose(stacked, expected, atol=1e-6)


def test_unknown_dataset_is_a_clear_error_listing_the_registered_ones() -> None:
    listed = ", ".join(dataset_names())
    assert {"digits", "mnist", "cifar10", "imagefolder"} <= set(dataset_names())
    with pytest.raises(ConfigError, match=f"data.name: unknown dataset 'svhn': choose one of {listed}"):
        load_config("digits", ["data.name=svhn"])
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'svhn'"):
        load_config("digits", ["method=nayer", "data.name=svhn"])  # the preset needs its native resolution
    with pytest.raises(DatasetError, match=f"data.name: unknown dataset 'svhn': choose one of {listed}"):
        load_dataset(DataConfig.model_construct(name="svhn", root=None, resolution=None, eval_batch_size=8))


def test_a_dataset_spec_needs_one_mean_and_std_per_channel() -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        DatasetSpec("rgb", 10, 3, 32, mean=(0.5,), std=(0.5,), flip_safe=True)


def test_normalisation_round_trip(digits: ImageSplits) -> None:
    images, _ = _stack(digits.test)
    images01 = denormalize(images, digits.info)
    assert images01.min() >= -1e-6 and images01.max() <= 1 + 1e-6
    assert torch.allclose(normalize(images01, digits.info), images, atol=1e-5)
    # The stored [0,1] pixels, normalised, are exactly what the dataset yields.
    assert torch.allclose(normalize(digits.test.images, digits.info), images, atol=1e-6)
    # Works on a single [C,H,W] image too, and names a channel mismatch.
    assert normalize(images01[0], digits.info).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="channel"):
        normalize(torch.zeros(2, 3, 16, 16), digits.info)


def test_resolution_override() -> None:
    native = load_dataset(DataConfig(resolution=8))
    assert native.info.resolution == 8 and native.test[0][0].shape == (1, 8, 8)
    # At 8x8 the images are the raw scikit-learn pixels / 16.
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images / 16.0).float()
    assert any(torch.allclose(denormalize(native.test[0][0], native.info)[0], r, atol=1e-6) for r in raw)
    large = load_dataset(DataConfig(resolution=40))
    assert large.info.resolution == 40 and large.train[5][0].shape == (1, 40, 40)
    assert large.info.mean == native.info.mean  # normalisation does not depend on the resolution


def test_lazy_resize_matches_precomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6)
    info = muse_data.DatasetInfo("mnist", 10, tuple("0123456789"), 1, (0.5,), (0.25,), 32)
    eager = muse_data.InMemoryImages(images, labels, info)
    monkeypatch.setattr(muse_data, "_PRERESIZE_LIMIT_BYTES", 0)
    lazy = muse_data.InMemoryImages(images, labels, info)
    assert eager.images.shape == (6, 1, 32, 32) and lazy.images.shape == (6, 1, 28, 28)
    for i in range(6):
        assert torch.equal(eager[i][0], lazy[i][0]) and eager[i][1] == lazy[i][1] == i


def test_one_resize_serves_stored_images_and_network_inputs() -> None:
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    up = resize(images, 32)  # stored uint8 images stay uint8, rounded
    assert up.dtype == torch.uint8
    assert torch.equal(up, resize(images.float(), 32).round().clamp(0, 255).to(torch.uint8))
    floats = torch.rand(2, 3, 32, 32, requires_grad=True)
    down = resize(floats, 16)  # antialiased when shrinking, differentiable
    expected = F.interpolate(floats, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(down, expected)
    down.sum().backward()
    assert floats.grad is not None and resize(floats, 32) is floats


def test_iterate_batches_is_ordered_and_complete(digits: ImageSplits) -> None:
    batches = list(iterate_batches(digits.test, 100))
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([y for _, y in batches]), digits.test.labels)


def test_shuffled_batches_cover_the_split_once_with_the_items_values(digits: ImageSplits) -> None:
    split = digits.train
    batches = list(iterate_batches(split, 128, shuffle=torch.Generator().manual_seed(0)))
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels[order])
    assert sorted(order.tolist()) == list(range(len(split)))
    first_image, first_label = split[int(order[0])]
    assert torch.equal(batches[0][0][0], first_image) and int(batches[0][1][0]) == first_label


# --- errors --------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(DataConfig(name="mnist", root=tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="data.root is required"):
        load_dataset(DataConfig.model_construct(name="cifar10", root=None, resolution=None, eval_batch_size=8))


def test_missing_npz(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train\.npz is missing"):
        load_dataset(DataConfig(name="mnist", root=tmp_path))
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"test\.npz is missing"):
        load_dataset(DataConfig(name="mnist", root=tmp_path))


def test_npz_missing_an_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 28, 28), np.uint8))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"train\.npz has no array 'y'"):
        load_dataset(DataConfig(name="mnist", root=tmp_path))
    np.savez(tmp_path / "train.npz", jpeg=np.zeros(4, np.uint8), labels=np.zeros(1, np.uint8),
             classes=np.array(["a"]))
    with pytest.raises(DatasetError, match=r"train\.npz has no array 'offsets'"):
        load_dataset(DataConfig(name="cifar10", root=tmp_path))


def test_bad_labels_and_resolution(tmp_path: Path) -> None:
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.array([0, 10], np.uint8))
    with pytest.raises(DatasetError, match=r"labels span 0\.\.10, expected 0\.\.9"):
        load_dataset(DataConfig(name="mnist", root=tmp_path))
    with pytest.raises(DatasetError, match="at least 4 pixels"):
        load_dataset(DataConfig.model_construct(name="digits", root=None, resolution=2, eval_batch_size=8))


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [_jpeg((255, 0, 0)), _jpeg((0, 0, 255)), _jpeg((0, 255, 0))]
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    blob = np.frombuffer(b"".join(files), np.uint8)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", jpeg=blob, offsets=offsets, labels=np.array([0, 1, 1], np.uint8),
                 classes=np.array(["red", "blue"]))
    splits = load_dataset(DataConfig(name="cifar10", root=tmp_path))
    assert splits.info.class_names == ("red", "blue") and splits.info.in_chans == 3
    image, label = splits.train[1]
    assert image.shape == (3, 32, 32) and label == 1
    pixel = denormalize(image, splits.info)[:, 16, 16]
    assert torch.allclose(pixel, torch.tensor([0.0, 0.0, 1.0]), atol=0.03)
    # The PIL fallback (for a torchvision without image decoding) gives the same pixels.
    monkeypatch.setattr(muse_data, "_decode_torchvision", lambda blob, bounds: None)
    fallback = load_dataset(DataConfig(name="cifar10", root=tmp_path))
    assert torch.equal(fallback.train.images, splits.train.images)
    # A corrupt JPEG is reported, naming the file.
    broken = blob.copy()
    broken[offsets[1]:offsets[1] + 40] = 0
    np.savez(tmp_path / "test.npz", jpeg=broken, offsets=offsets, labels=np.array([0, 1, 1], np.uint8),
             classes=np.array(["red", "blue"]))
    with pytest.raises(DatasetError, match=r"test\.npz holds an undecodable JPEG"):
        load_dataset(DataConfig(name="cifar10", root=tmp_path))


# --- imagefolder ---------------------------------------------------------------------------------


def _image_folder(root: Path, splits: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    splits = load_dataset(DataConfig(name="imagefolder", root=tmp_path, resolution=24))
    info = splits.info
    assert info.class_names == ("cat", "dog") and info.num_classes == 2 and info.in_chans == 3
    assert info.resolution == 24 and info.mean == get_dataset("imagefolder").mean
    assert (len(splits.train), len(splits.test)) == (4, 4)
    images, labels = next(iter(iterate_batches(splits.test, 8)))
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]
    assert load_dataset(DataConfig(name="imagefolder", root=tmp_path)).train[0][0].shape == (3, 224, 224)


def test_imagefolder_errors(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"train": ["cat", "dog"]})
    with pytest.raises(DatasetError, match=r"val is missing"):
        load_dataset(DataConfig(name="imagefolder", root=tmp_path))
    _image_folder(tmp_path, {"val": ["cat"]})
    with pytest.raises(DatasetError, match="same class folders"):
        load_dataset(DataConfig(name="imagefolder", root=tmp_path))


# --- real data (skipped without ../shared/data) --------------------------------------------------


@pytest.fixture(scope="module")
def cifar10() -> ImageSplits:
    return load_dataset(DataConfig(name="cifar10", root=_shared("cifar10-jpeg")))


def test_real_mnist() -> None:
    splits = load_dataset(DataConfig(name="mnist", root=_shared("mnist")))
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.info.resolution == 32 and splits.info.in_chans == 1 and splits.info.num_classes == 10
    for split in (splits.train, splits.test):
        assert split.images.shape[1:] == (1, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.min() == 0 and split.labels.max() == 9
    images, labels = _stack(splits.test)
    assert images.shape == (10000, 1, 32, 32) and torch.equal(labels, splits.test.labels)
    images01 = denormalize(images, splits.info)
    assert images01.min() >= -1e-5 and images01.max() <= 1 + 1e-5
    assert images01.mean().item() == pytest.approx(0.1325, abs=0.003)  # MNIST's test mean pixel


def test_real_cifar10(cifar10: ImageSplits) -> None:
    info = cifar10.info
    assert (len(cifar10.train), len(cifar10.test)) == (50000, 10000)
    assert info.class_names[:2] == ("airplane", "automobile") and info.num_classes == 10
    assert info.in_chans == 3 and info.resolution == 32
    for split in (cifar10.train, cifar10.test):
        assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert torch.bincount(split.labels).tolist() == [len(split) // 10] * 10
    image, label = cifar10.test[9999]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    # Decoded pixels agree with PIL's decoder on a few images.
    with np.load(_shared("cifar10-jpeg") / "test.npz") as npz:
        jpeg, offsets = npz["jpeg"], npz["offsets"]
    for i in (0, 4321, 9999):
        pil = np.array(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        assert torch.equal(cifar10.test.images[i], torch.from_numpy(pil).permute(2, 0, 1))
