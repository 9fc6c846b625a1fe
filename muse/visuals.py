"""Pictures of a run for the tracker: synthetic image grids, teacher CAM overlays, accuracy curves.

Everything here returns PIL images or matplotlib figures; `muse.tracking` decides where they go.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torchvision.utils import make_grid

from muse.data import DatasetInfo
from muse.models.features import class_activation_map, classifier_weight, features_and_logits, supports_cam
from muse.synthesis import SynthesisRecord
from muse.transforms import model_input

GRID_IMAGES = 64  # images per synthetic-image grid
CAM_IMAGES = 16  # images per CAM overlay grid


def image_grid(images01: torch.Tensor, scale: int = 2) -> Image.Image:
    """[n, C, r, r] images in [0,1] as one grid, 8 per row, each pixel shown `scale`× (nearest)."""
    grid = make_grid(images01.float().cpu(), nrow=8, padding=1)
    pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)


@torch.no_grad()
def teacher_cams(teacher: torch.nn.Module, images01: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 teacher_input: str) -> torch.Tensor:
    """The teacher's CAM of each image's own label, [n, h, w] in [0,1], as the key-region loss sees it."""
    device = next(teacher.parameters()).device
    mean = torch.tensor(info.mean, device=device)
    std = torch.tensor(info.std, device=device)
    resize_to = info.resolution if teacher_input == "resize" else None
    was_training = teacher.training
    teacher.eval()
    feature_map, _ = features_and_logits(teacher, model_input(images01.to(device), mean, std, resize_to))
    teacher.train(was_training)
    return class_activation_map(feature_map, classifier_weight(teacher), labels.to(device)).cpu()


def cam_overlay(images01: torch.Tensor, cams: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Images with their CAM blended on top in the `jet` colour map: [n, 3, r, r] in [0,1]."""
    size = images01.shape[-2:]
    heat = F.interpolate(cams[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    colours = torch.from_numpy(colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3]).permute(0, 3, 1, 2).float()
    base = images01.float().cpu()
    base = base.expand(-1, 3, -1, -1) if base.shape[1] == 1 else base
    return (1 - alpha) * base + alpha * colours


def epoch_visuals(epoch: int, records: dict[int, SynthesisRecord], teacher: torch.nn.Module | None,
                  info: DatasetInfo, teacher_input: str) -> dict[str, Image.Image]:
    """Artifact path → picture for one evaluation: an image grid per resolution, and the teacher's CAM
    overlays per resolution when the teacher has a CAM (a GAP + linear head)."""
    pictures: dict[str, Image.Image] = {}
    for resolution, record in records.items():
        images = record.images01()
        pictures[f"images/epoch{epoch:04d}-{resolution}px.png"] = image_grid(images[:GRID_IMAGES])
        if teacher is not None and supports_cam(teacher):
            shown = images[:CAM_IMAGES]
            cams = teacher_cams(teacher, shown, torch.tensor(record.labels[:CAM_IMAGES]), info, teacher_input)
            pictures[f"cam/epoch{epoch:04d}-{resolution}px.png"] = image_grid(cam_overlay(shown, cams), scale=4)
    return pictures


X_LABELS = {"epoch": "epoch", "pixels": "pixels synthesised", "images": "images synthesised",
            "synthesis_s": "synthesis seconds"}


def accuracy_curves(curves: dict[str, list[dict[str, Any]]], teacher_acc: float | None, title: str,
                    key: str = "student_acc", x: str = "epoch") -> Figure:
    """`key` (student top-1 by default) against `x` (the epoch, or the cumulative `pixels`, `images` or
    `synthesis_s` of each history entry), one line per run (a run's history entries), the teacher as a
    dashed line."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for label, history in curves.items():
        points = [h for h in history if x in h]
        axes.plot([h[x] for h in points], [h[key] for h in points], marker=".", label=label)
    if teacher_acc is not None and np.isfinite(teacher_acc):
        axes.axhline(teacher_acc, linestyle="--", color="grey", label=f"teacher {teacher_acc:.2f}%")
    if x == "epoch":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(X_LABELS.get(x, x))
    axes.set_ylabel("student top-1 on the test split (%)" if key == "student_acc" else key)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
