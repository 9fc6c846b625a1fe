"""Differentiable batch transforms shared by synthesis (inside the generator loop) and distillation:
random translation (a crop with zero padding) and optional horizontal flip, per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLIP_SAFE = {"cifar10": True, "imagefolder": True, "digits": False, "mnist": False}


def random_shift_flip(images: torch.Tensor, max_shift: float = 0.125, flip: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a whole number of pixels up to `max_shift`·size (what RandomCrop with
    padding does), and mirror half of them when `flip`. Gradients flow to `images`."""
    batch, _, height, width = images.shape
    device = images.device
    max_pixels = int(round(max_shift * height))
    shifts = torch.randint(-max_pixels, max_pixels + 1, (batch, 2), generator=generator).to(device)
    signs = torch.ones(batch, device=device)
    if flip:
        signs = torch.where(torch.rand(batch, generator=generator).to(device) < 0.5, -signs, signs)
    theta = torch.zeros(batch, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = signs
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / width
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize to a square `resolution` (antialiased when shrinking); a no-op when equal."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    shrink = images.shape[-1] > resolution
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=shrink)


def model_input(images01: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                resolution: int | None = None) -> torch.Tensor:
    """Images in [0,1] → what a network trained on the dataset expects: resized to `resolution` when
    given (`*_input: resize`), else left at their native size, then normalised per channel."""
    if resolution is not None:
        images01 = resize(images01, resolution)
    return (images01 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
