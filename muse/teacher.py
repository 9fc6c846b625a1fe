"""Teachers: train a registered model on a real dataset, save it with its metadata (atomically), and
load it back safely (`weights_only=True`), checking the metadata against the run's config."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import muse.models  # noqa: F401  (registers our architectures with timm)
from muse.config import ComputeOptions, ConfigError, RunConfig
from muse.data import DatasetInfo, ImageSplits, iterate_batches
from muse.distillation import cosine_schedule
from muse.evaluate import LARGE_TEST_SPLIT, topk_accuracy
from muse.io import save_torch
from muse.precision import Precision
from muse.saved_models import TEACHER_FORMAT, load_classifier
from muse.datasets import get_dataset
from muse.transforms import random_shift_flip



def train_supervised(model: nn.Module, splits: ImageSplits, epochs: int, batch_size: int, lr: float,
                     weight_decay: float, seed: int, device: torch.device | str = "cpu",
                     desc: str = "train", compute: ComputeOptions | None = None) -> float:
    """Cross-entropy training on the real training split (shift/flip augmentation, SGD, cosine LR), with
    `compute`'s autocast and memory format (default: fp32, NCHW). Returns test accuracy in percent. Used
    for teachers and for the `real` reference student."""
    precision = Precision.of(compute or ComputeOptions(), torch.device(device))
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(splits.train) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                                nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(epochs * steps_per_epoch))
    flip = get_dataset(splits.info.name).flip_safe
    precision.model(model.to(device)).train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", dynamic_ncols=True)
    for epoch in range(epochs):
        for images, labels in iterate_batches(splits.train, batch_size, shuffle=order):
            images = precision.images(random_shift_flip(images.to(device), flip=flip))
            with precision.forward_context():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            if bar.n % 20 == 0:  # .item() waits for the device: not at every batch
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
    bar.close()
    return topk_accuracy(model, splits.test, (1,), device=device, progress=len(splits.test) >= LARGE_TEST_SPLIT)[1]


def train_teacher(cfg: RunConfig, splits: ImageSplits, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Train `cfg.teacher.arch` on the real data and save it to `cfg.teacher_checkpoint`."""
    info = splits.info
    torch.manual_seed(cfg.seed)  # the initial weights too: the same config trains the same teacher
    model = timm.create_model(cfg.teacher.arch, num_classes=info.num_classes, in_chans=info.in_chans)
    started = time.perf_counter()
    t = cfg.teacher
    test_acc = train_supervised(model, splits, t.epochs, t.batch_size, t.lr, t.weight_decay, cfg.seed, device,
                                desc=f"teacher {t.arch}", compute=t)
    meta = {
        "arch": t.arch, "dataset": info.name, "num_classes": info.num_classes,
        "class_names": list(info.class_names), "in_chans": info.in_chans, "mean": list(info.mean),
        "std": list(info.std), "resolution": info.resolution, "test_acc": test_acc, "epochs": t.epochs,
        "train_s": time.perf_counter() - started,
    }
    save_teacher(cfg.teacher_checkpoint, model, meta)
    return model.eval(), meta


def save_teacher(path: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch({"format": TEACHER_FORMAT, "meta": meta, "state_dict": state}, path)


def load_teacher(path: Path, arch: str, info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """Load a teacher checkpoint written by `save_teacher`, or a plain state dict of `arch` (a user's
    file), and check it fits the run: architecture, class count, input channels, dataset."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"teacher checkpoint {str(path)!r} is a folder, not a checkpoint file: point "
                          "teacher.checkpoint at the .pt file (or at a path to train and cache one at)")
    if not path.is_file():
        raise ConfigError(f"teacher checkpoint {str(path)!r} not found: train one with `muse train-teacher "
                          "--config ...`, set teacher.train_if_missing=true, or fix teacher.checkpoint")
    saved = load_classifier(path, arch=arch, info=info, arch_field="teacher.arch")
    if saved.meta.get("dataset", info.name) != info.name:
        raise ConfigError(f"teacher checkpoint {str(path)!r} does not fit this run: it was trained on "
                          f"{saved.meta['dataset']!r}, not {info.name!r}")
    return saved.model, saved.meta


def ensure_teacher(cfg: RunConfig, splits: ImageSplits, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The run's teacher: loaded from its checkpoint, or trained and cached there on first use."""
    path = cfg.teacher_checkpoint
    if not path.exists() and cfg.teacher.train_if_missing:
        print(f"teacher checkpoint {path} not found: training {cfg.teacher.arch} on {splits.info.name} (cached)")
        return train_teacher(cfg, splits, device)
    return load_teacher(path, cfg.teacher.arch, splits.info)
