"""Every dataset a run can name, once: the facts about it that do not depend on the files on disk.

One frozen `DatasetSpec` per dataset: class count, channels, native (default evaluation) resolution,
the normalisation constants of its [0,1] training pixels, and whether a horizontal flip keeps the label.
`muse.data` loads and normalises with them, `DataConfig` checks `data.name` against them, synthesis and
distillation ask them whether to flip, and our models' default configs take their input size and mean/std
from them. Adding a dataset: `register_dataset(DatasetSpec(...))` here, and its loader in `muse.data`.

Class names are not here: they are read with the data (CIFAR-10's from its files, imagefolder's from its
folders). This module imports nothing heavy (no torch, no muse.config), so the config schema can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "UnknownDatasetError",
    "dataset_names",
    "get_dataset",
    "register_dataset",
]


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message says what is wrong and how to fix it."""


class UnknownDatasetError(ValueError):
    """A dataset name that is not registered; the message lists the registered ones."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int | None  # None: read with the data (imagefolder: one class per sub-folder)
    channels: int
    native_resolution: int  # the evaluation resolution when data.resolution is unset
    mean: tuple[float, ...]  # per channel, of the [0,1] training pixels at the source resolution
    std: tuple[float, ...]  # (so one normalisation serves every resolution images are made at)
    flip_safe: bool  # a horizontal flip keeps the label (not for digits: a mirrored 3 is no digit)

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.std) == self.channels):
            raise ValueError(f"dataset {self.name!r}: mean and std need one value per channel ({self.channels})")
        if min(self.std) <= 0:
            raise ValueError(f"dataset {self.name!r}: std must be positive, got {self.std}")


_REGISTRY: dict[str, DatasetSpec] = {}
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_REGISTRY)  # name → spec, read-only view


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """File `spec` under its name; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    """The registered dataset names, in registration order."""
    return tuple(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as `name`; raises `UnknownDatasetError` listing the registered names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: choose one of {', '.join(_REGISTRY)}"
        ) from None


# scikit-learn's 8×8 digits: mean/std of the [0,1] training pixels (pixels/16, float64) of the fixed
# stratified split in `muse.data`, which `tests/test_data.py` recomputes. Evaluated upsampled to 16×16,
# where the mean is unchanged and the std is 0.319; the source pixels' constants are the ones used.
register_dataset(DatasetSpec(
    "digits", num_classes=10, channels=1, native_resolution=16,
    mean=(0.3053833942240780,), std=(0.3761191680900195,), flip_safe=False,
))
# The standard constants of the 28×28 images; after the bilinear resize to 32 they are 0.1309 / 0.2892.
register_dataset(DatasetSpec(
    "mnist", num_classes=10, channels=1, native_resolution=32,
    mean=(0.1307,), std=(0.3081,), flip_safe=False,
))
# The per-channel mean/std of the training pixels. (The CMI/Fast/NAYER code bases normalise with a widely
# copied std of (0.2023, 0.1994, 0.2010) instead; our models' default configs follow the data pipeline.)
register_dataset(DatasetSpec(
    "cifar10", num_classes=10, channels=3, native_resolution=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip_safe=True,
))
# Any folder of class folders, normalised with ImageNet's constants.
register_dataset(DatasetSpec(
    "imagefolder", num_classes=None, channels=3, native_resolution=224,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), flip_safe=True,
))
