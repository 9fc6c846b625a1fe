"""Batch transforms shared by the data pipeline, synthesis (inside the generator loop) and distillation:
random translation (a crop with zero padding) and optional horizontal flip, per sample; the one bilinear
resize; and the mapping of [0,1] images to a network's input."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift_flip(images: torch.Tensor, max_shift: float = 0.125, flip: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a whole number of pixels up to `max_shift`·size (what RandomCrop with
    padding does: zeros come in at the edges), and mirror half of them when `flip`. Gradients flow to
    `images`. One gather from the zero-padded batch: the values of nearest-neighbour `grid_sample` at
    integer offsets, at about half its cost."""
    batch, _, height, width = images.shape
    device = images.device
    max_pixels = int(round(max_shift * height))
    shifts = torch.randint(-max_pixels, max_pixels + 1, (batch, 2), generator=generator).to(device)
    mirrored = torch.zeros(batch, dtype=torch.bool, device=device)
    if flip:
        mirrored = (torch.rand(batch, generator=generator) < 0.5).to(device)
    cols = torch.arange(width, device=device).expand(batch, width)
    cols = torch.where(mirrored[:, None], width - 1 - cols, cols) + shifts[:, :1] + max_pixels
    rows = torch.arange(height, device=device).expand(batch, height) + shifts[:, 1:] + max_pixels
    padded = F.pad(images, (max_pixels,) * 4).permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
    samples = torch.arange(batch, device=device)[:, None, None]
    return padded[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of [B,C,H,W] to a square `resolution` (`align_corners=False`, antialiased when
    shrinking); a no-op when already that size. Float images are resized in their own dtype (gradients
    flow); other dtypes in float32 and cast back, uint8 rounded and clamped to 0..255."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    shrinking = resolution < max(images.shape[-2:])
    out = F.interpolate(images if images.is_floating_point() else images.float(), size=(resolution, resolution),
                        mode="bilinear", align_corners=False, antialias=shrinking)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def model_input(images01: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                resolution: int | None = None) -> torch.Tensor:
    """Images in [0,1] → what a network trained on the dataset expects: resized to `resolution` when
    given (`*_input: resize`), else left at their native size, then normalised per channel."""
    if resolution is not None:
        images01 = resize(images01, resolution)
    return (images01 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
