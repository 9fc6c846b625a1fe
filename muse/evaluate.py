"""Top-k accuracy on the real test split, at its native resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from muse.data import iterate_batches

LARGE_TEST_SPLIT = 10_000  # evaluations of this many images or more show a progress bar


@torch.no_grad()
def topk_accuracy(model: nn.Module, dataset: Dataset, ks: Sequence[int] = (1,), batch_size: int = 512,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict[int, float]:
    """Top-k accuracy of `model` (returning logits) on `dataset` for each k in `ks`, in percent."""
    was_training = model.training
    model.eval()
    correct = dict.fromkeys(ks, 0)
    total = 0
    batches = iterate_batches(dataset, batch_size)
    if progress:
        batches = tqdm(batches, total=-(-len(dataset) // batch_size), desc="evaluate", unit="batch", leave=False)
    for images, labels in batches:
        ranked = model(images.to(device)).topk(max(ks), dim=1).indices.cpu()
        hits = ranked == labels.view(-1, 1)
        for k in ks:
            correct[k] += hits[:, :k].any(dim=1).sum().item()
        total += len(labels)
    model.train(was_training)
    return {k: 100.0 * correct[k] / max(1, total) for k in ks}


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` (returning logits) on `dataset`, in percent."""
    return topk_accuracy(model, dataset, (1,), batch_size, device)[1]
