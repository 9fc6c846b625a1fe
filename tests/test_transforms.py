"""random_shift_flip: the values of RandomCrop-with-padding + flip, as nearest-neighbour grid sampling
at integer offsets gives them (the implementation it replaced), with gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muse.transforms import random_shift_flip


def grid_sample_shift_flip(images: torch.Tensor, max_shift: float, flip: bool,
                           generator: torch.Generator) -> torch.Tensor:
    """The reference: the same random draws, applied through an affine grid."""
    batch, _, height, width = images.shape
    max_pixels = int(round(max_shift * height))
    shifts = torch.randint(-max_pixels, max_pixels + 1, (batch, 2), generator=generator)
    signs = torch.ones(batch)
    if flip:
        signs = torch.where(torch.rand(batch, generator=generator) < 0.5, -signs, signs)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = signs, 1.0
    theta[:, 0, 2], theta[:, 1, 2] = shifts[:, 0] * 2.0 / width, shifts[:, 1] * 2.0 / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def test_matches_grid_sampling_exactly_for_every_offset_and_flip():
    images = torch.rand(256, 3, 16, 16)
    for flip in (True, False):
        ours = random_shift_flip(images, 0.25, flip, torch.Generator().manual_seed(3))
        reference = grid_sample_shift_flip(images, 0.25, flip, torch.Generator().manual_seed(3))
        assert torch.equal(ours, reference)


def test_shifts_bring_in_zeros_and_gradients_reach_every_kept_pixel():
    images = torch.ones(64, 1, 8, 8, requires_grad=True)
    out = random_shift_flip(images, 0.25, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.is_contiguous()
    assert (out == 0).any() and (out == 1).any()  # some images moved, some pixels kept
    out.sum().backward()
    assert images.grad.sum() == out.sum()  # each output pixel came from one input pixel or the zero border
