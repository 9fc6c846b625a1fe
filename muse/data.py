"""Real datasets: the teacher's training data and the student's evaluation data (never used to distill).

`load_dataset(cfg.data)` returns train/test splits that yield `(normalised float image [C,R,R], int label)`
at the evaluation resolution R, plus a `DatasetInfo` with the class names and the normalisation constants.

Which datasets exist, their native resolution and normalisation constants come from `muse.datasets`.
Resizing to R is `muse.transforms.resize` (bilinear, antialiased when shrinking) for every in-memory dataset:
digits go 8→16 and MNIST 28→32 by default. (DAFL zero-pads MNIST to 32; a resize keeps one rule for every
dataset and resolution.) The normalisation constants are those of the source pixels and do not depend on R,
so images synthesised at several resolutions share one normalisation.

The MNIST and CIFAR-10 files are sorted by class: shuffle before training, and evaluate on whole splits
(a prefix of the test split is a few classes only).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from muse.config import DataConfig
from muse.datasets import DatasetError, DatasetSpec, UnknownDatasetError, get_dataset
from muse.transforms import resize

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "ImageSplits",
    "InMemoryImages",
    "denormalize",
    "iterate_batches",
    "load_dataset",
    "normalize",
]

# Above this many bytes, resized uint8 images are not precomputed but resized one at a time on access.
_PRERESIZE_LIMIT_BYTES = 1 << 30
_RESIZE_CHUNK = 4096


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    in_chans: int
    mean: tuple[float, ...]  # per channel, of the [0,1] training images (the registry's)
    std: tuple[float, ...]
    resolution: int  # the evaluation resolution in use

    @classmethod
    def of(cls, spec: DatasetSpec, class_names: tuple[str, ...], resolution: int) -> DatasetInfo:
        """The info of registered dataset `spec` with the class names read from its data."""
        return cls(name=spec.name, num_classes=len(class_names), class_names=class_names, in_chans=spec.channels,
                   mean=spec.mean, std=spec.std, resolution=resolution)


@dataclass
class ImageSplits:
    train: Dataset  # yields (normalised float image [C,R,R], int label)
    test: Dataset
    info: DatasetInfo


class InMemoryImages(Dataset):
    """Images held in memory (uint8 0..255 or float [0,1], [N,C,H,W]); resized and normalised on access.

    Images are resized to `info.resolution` once at construction when the result fits in 1 GiB, otherwise
    one at a time in `__getitem__` (same arithmetic, so both paths give identical values).
    """

    def __init__(self, images: Tensor, labels: Tensor, info: DatasetInfo) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise DatasetError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        resolution = info.resolution
        resized_bytes = images.shape[0] * images.shape[1] * resolution * resolution * images.element_size()
        if images.shape[-2:] != (resolution, resolution) and resized_bytes <= _PRERESIZE_LIMIT_BYTES:
            images = torch.cat([resize(chunk, resolution) for chunk in images.split(_RESIZE_CHUNK)])
        self.images = images
        self.labels = labels.long()
        self.info = info
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.batch(torch.tensor([index]))
        return images[0], int(labels[0])

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images [B,C,R,R] and labels [B] of `indices`, as whole tensors (no per-item work)."""
        images = self.images[indices]
        if images.shape[-2:] != (self.info.resolution, self.info.resolution):
            images = resize(images, self.info.resolution)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self._mean) / self._std, self.labels[indices]


def load_dataset(cfg: DataConfig) -> ImageSplits:
    """Load the train and test splits named by `cfg` at `cfg.resolution` (default: the native one).

    Raises `DatasetError` naming the problem (missing folder, file, or array; bad resolution).
    """
    try:
        spec = get_dataset(cfg.name)
    except UnknownDatasetError as error:
        raise DatasetError(f"data.name: {error}") from None
    resolution = cfg.resolution if cfg.resolution is not None else spec.native_resolution
    if not isinstance(resolution, int) or resolution < 4:
        raise DatasetError(f"data.resolution={resolution!r} is unusable: use an integer of at least 4 pixels")
    if cfg.name == "digits":
        return _load_digits(spec, resolution)
    root = _check_root(cfg)
    if cfg.name == "mnist":
        return _load_mnist(spec, root, resolution)
    if cfg.name == "cifar10":
        return _load_cifar10(spec, root, resolution)
    if cfg.name == "imagefolder":
        return _load_imagefolder(spec, root, resolution)
    raise DatasetError(f"data.name={cfg.name!r} has no loader")


def normalize(images01: Tensor, info: DatasetInfo) -> Tensor:
    """Map images in [0,1] ([B,C,H,W] or [C,H,W]) to the dataset's normalised space."""
    mean, std = _stats(images01, info)
    return (images01 - mean) / std


def denormalize(images: Tensor, info: DatasetInfo) -> Tensor:
    """Inverse of `normalize`: normalised images back to [0,1] (not clamped)."""
    mean, std = _stats(images, info)
    return images * std + mean


def iterate_batches(split: Dataset, batch_size: int,
                    shuffle: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(normalised images, labels) batches of a whole split: in order (evaluation), or in a random order
    drawn from `shuffle` (training); the last batch may be smaller. In-memory splits are sliced as whole
    tensors, other datasets (imagefolder) go through a DataLoader."""
    if isinstance(split, InMemoryImages):
        order = torch.randperm(len(split), generator=shuffle) if shuffle is not None else torch.arange(len(split))
        for indices in order.split(batch_size):
            yield split.batch(indices)
    else:
        yield from DataLoader(split, batch_size=batch_size, shuffle=shuffle is not None, generator=shuffle,
                              num_workers=0, drop_last=False)


def _stats(images: Tensor, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    if images.ndim < 3 or images.shape[-3] != len(info.mean):
        raise ValueError(
            f"images of shape {tuple(images.shape)} do not have {len(info.mean)} channel(s) at dim -3 "
            f"as {info.name} needs"
        )
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return mean, std


def _check_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DatasetError(f"data.root is required for data.name={cfg.name!r}: set it to the dataset folder")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data.root={str(cfg.root)!r} ({root.resolve()}) is not a folder: point data.root at the "
            f"{cfg.name} dataset folder (relative paths are taken from the working directory)"
        )
    return root


def _read_npz(path: Path, arrays: tuple[str, ...], dataset: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"{dataset}: {path} is missing: data.root must hold train.npz and test.npz "
            f"(arrays {', '.join(arrays)})"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in arrays if name not in npz.files]
            if missing:
                raise DatasetError(
                    f"{dataset}: {path} has no array {missing[0]!r} (it has {', '.join(npz.files) or 'none'}); "
                    f"a {dataset} npz needs arrays {', '.join(arrays)}"
                )
            return {name: npz[name] for name in arrays}
    except DatasetError:
        raise
    except (OSError, ValueError) as error:
        raise DatasetError(f"{dataset}: {path} is not a readable .npz file ({error}): rebuild it") from None


def _check_labels(labels: np.ndarray, count: int, num_classes: int, where: str) -> Tensor:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DatasetError(f"{where}: labels have shape {labels.shape}, expected ({count},), one per image")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _load_digits(spec: DatasetSpec, resolution: int) -> ImageSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797,1,8,8] in [0,1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    info = DatasetInfo.of(spec, tuple(str(c) for c in range(spec.num_classes)), resolution)
    return ImageSplits(
        train=InMemoryImages(torch.from_numpy(x_train), torch.from_numpy(y_train), info),
        test=InMemoryImages(torch.from_numpy(x_test), torch.from_numpy(y_test), info),
        info=info,
    )


def _load_mnist(spec: DatasetSpec, root: Path, resolution: int) -> ImageSplits:
    info = DatasetInfo.of(spec, tuple(str(c) for c in range(spec.num_classes)), resolution)
    splits = []
    for split in ("train", "test"):
        path = root / f"{split}.npz"
        arrays = _read_npz(path, ("x", "y"), "mnist")
        x = arrays["x"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DatasetError(f"mnist: {path} array 'x' is {x.dtype} {x.shape}, expected uint8 [N,28,28]")
        labels = _check_labels(arrays["y"], x.shape[0], info.num_classes, f"mnist: {path} array 'y'")
        splits.append(InMemoryImages(torch.from_numpy(x)[:, None], labels, info))
    return ImageSplits(train=splits[0], test=splits[1], info=info)


def _load_cifar10(spec: DatasetSpec, root: Path, resolution: int) -> ImageSplits:
    splits = []
    class_names: tuple[str, ...] = ()
    for split in ("train", "test"):
        path = root / f"{split}.npz"
        arrays = _read_npz(path, ("jpeg", "offsets", "labels", "classes"), "cifar10")
        names = tuple(str(c) for c in arrays["classes"])
        if not names or (class_names and names != class_names):
            raise DatasetError(f"cifar10: {path} array 'classes' is {names}, expected the train split's classes")
        class_names = names
        images = _decode_jpegs(arrays["jpeg"], arrays["offsets"], path)
        labels = _check_labels(arrays["labels"], images.shape[0], len(names), f"cifar10: {path} array 'labels'")
        splits.append((images, labels))
    info = DatasetInfo.of(spec, class_names, resolution)
    return ImageSplits(
        train=InMemoryImages(*splits[0], info), test=InMemoryImages(*splits[1], info), info=info
    )


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, path: Path) -> Tensor:
    """Decode concatenated JPEGs to uint8 [N,3,H,W] (all images must share one size).

    torchvision's decoder is ~3x faster than PIL's (1.7 s vs 5.5 s for the 50k CIFAR-10 training images)
    and gives identical pixels (checked on all 60k). torchvision 0.29 deprecates it in favour of TorchCodec,
    so PIL is the fallback once it is gone.
    """
    if blob.ndim != 1 or blob.dtype != np.uint8:
        raise DatasetError(f"cifar10: {path} array 'jpeg' is {blob.dtype} {blob.shape}, expected 1-D uint8")
    if (
        offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != blob.shape[0]
        or np.any(np.diff(offsets) <= 0)
    ):
        raise DatasetError(
            f"cifar10: {path} array 'offsets' must rise strictly from 0 to len(jpeg)={blob.shape[0]}: rebuild it"
        )
    bounds = offsets.tolist()
    try:
        decoded = _decode_torchvision(blob, bounds)
        if decoded is None:
            decoded = _decode_pil(blob, bounds)
    except (RuntimeError, OSError, ValueError) as error:
        raise DatasetError(f"cifar10: {path} holds an undecodable JPEG ({error}): rebuild the file") from None
    sizes = {tuple(image.shape) for image in decoded}
    if len(sizes) != 1:
        raise DatasetError(f"cifar10: {path} mixes image sizes {sorted(sizes)}; all images must share one size")
    return torch.stack(decoded)


def _decode_torchvision(blob: np.ndarray, bounds: list[int]) -> list[Tensor] | None:
    """Decode with torchvision.io, or return None where it is unavailable."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    data = torch.from_numpy(blob)
    encoded = [data[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB))


def _decode_pil(blob: np.ndarray, bounds: list[int]) -> list[Tensor]:
    from PIL import Image

    images = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        with Image.open(io.BytesIO(blob[start:stop].tobytes())) as image:
            images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    return images


def _load_imagefolder(spec: DatasetSpec, root: Path, resolution: int) -> ImageSplits:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(int(resolution * 256 / 224)),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    folders = []
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(
                f"imagefolder: {folder} is missing: data.root must hold train/ and val/, "
                f"each with one sub-folder of images per class"
            )
        try:
            folders.append(datasets.ImageFolder(str(folder), transform=transform))
        except (FileNotFoundError, RuntimeError) as error:
            raise DatasetError(f"imagefolder: {folder}: {error}") from None
    train, val = folders
    if train.classes != val.classes:
        raise DatasetError(
            f"imagefolder: {root}/train has classes {train.classes} but {root}/val has {val.classes}: "
            f"both need the same class folders"
        )
    info = DatasetInfo.of(spec, tuple(train.classes), resolution)
    return ImageSplits(train=train, test=val, info=info)

