"""Top-1 accuracy on the real test split, at its native resolution."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from muse.data import iterate_batches


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` (returning logits) on `dataset`, in percent."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in iterate_batches(dataset, batch_size):
        logits = model(images.to(device))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(1, total)
