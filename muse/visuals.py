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
from PIL import Image, ImageDraw, ImageFont

from muse.data import DatasetInfo
from muse.models.features import class_activation_map, classifier_weight, features_and_logits, supports_cam
from muse.synthesis import SynthesisRecord
from muse.transforms import model_input

GRID_IMAGES = 64  # images per synthetic-image grid
CAM_IMAGES = 16  # images per CAM overlay grid
SIDE_BY_SIDE_IMAGES = 8  # images per resolution in the side-by-side picture
TILE_PX = 48  # smallest displayed tile: 8 px images are enlarged 6×
FONT_PX = 11


def labelled_grid(images01: torch.Tensor, captions: list[str], title: str, per_row: int = 8,
                  tile: int = TILE_PX) -> Image.Image:
    """[n, C, r, r] images in [0,1] as a grid with a caption under each tile and a title above. Small
    images are enlarged by a whole factor (nearest neighbour) to at least `tile` pixels, so an 8 px image
    stays readable and its pixels stay square."""
    n, _, height, width = images01.shape
    scale = max(1, -(-tile // max(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default(size=FONT_PX)
    caption_h, title_h, gap = FONT_PX + 4, FONT_PX + 8, 4
    columns = min(per_row, n)
    rows = -(-n // per_row)
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap, title_h + rows * (cell_h + caption_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), title, fill="black", font=font)
    pixels = (images01.float().clamp(0, 1) * 255).round().byte().cpu()
    for i in range(n):
        tile_pixels = pixels[i].permute(1, 2, 0).numpy()
        picture = Image.fromarray(tile_pixels[..., 0] if tile_pixels.shape[-1] == 1 else tile_pixels).convert("RGB")
        x = gap + (i % per_row) * (cell_w + gap)
        y = title_h + (i // per_row) * (cell_h + caption_h + gap)
        canvas.paste(picture.resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x, y + cell_h + 1), captions[i][: max(4, cell_w // (FONT_PX // 2 + 1))], fill="black", font=font)
    return canvas


def side_by_side(panels: list[Image.Image], title: str, gap: int = 12) -> Image.Image:
    """Pictures next to each other under a title, tops aligned, on white."""
    title_h = FONT_PX + 8
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                               title_h + max(p.height for p in panels)), "white")
    ImageDraw.Draw(canvas).text((4, 2), title, fill="black", font=ImageFont.load_default(size=FONT_PX))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, title_h))
        x += panel.width + gap
    return canvas


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
    """Artifact path → picture for one evaluation (`epoch` as shown to users, 1-based): per resolution a
    grid of synthetic images captioned with the class each was conditioned on, and the teacher's CAM of
    that class over each image when the teacher has a CAM (a GAP + linear head); and one picture with
    every resolution side by side, each enlarged to the same display size."""
    pictures: dict[str, Image.Image] = {}
    panels = []
    display = max(TILE_PX, max(records, default=TILE_PX))  # every resolution shown at one size
    for resolution, record in records.items():
        images = record.images01()
        names = [info.class_names[int(label)] for label in record.labels]
        shown = min(GRID_IMAGES, len(images))
        pictures[f"images/epoch{epoch:04d}-{resolution}px.png"] = labelled_grid(
            images[:shown], names[:shown], f"epoch {epoch}: {resolution} px synthetic images, captioned by class")
        panels.append(labelled_grid(images[:SIDE_BY_SIDE_IMAGES], names[:SIDE_BY_SIDE_IMAGES],
                                    f"{resolution} px", per_row=4, tile=display))
        if teacher is not None and supports_cam(teacher):
            shown = min(CAM_IMAGES, len(images))
            cams = teacher_cams(teacher, images[:shown], torch.tensor(record.labels[:shown]), info, teacher_input)
            pictures[f"cam/epoch{epoch:04d}-{resolution}px.png"] = labelled_grid(
                cam_overlay(images[:shown], cams), [f"CAM {n}" for n in names[:shown]],
                f"epoch {epoch}: teacher CAM of the conditioned class, {resolution} px")
    if panels:
        pictures[f"resolutions/epoch{epoch:04d}.png"] = side_by_side(
            panels, f"epoch {epoch}: the newest synthetic images of every resolution, shown at one size")
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
