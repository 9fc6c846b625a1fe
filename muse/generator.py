"""The NAYER noisy-layer generator with an output at every resolution of a set (MUSE).

LE[y] → BatchNorm1d → noisy Linear(d→z) (redrawn from N(0,1) before every synthesis episode, one per
copy of the K classes in the batch) → Linear(z → 2·ngf·s0²) → stages of [Upsample×2, Conv3×3, BN,
LeakyReLU] → a Conv3×3 head → Sigmoid, an image in [0,1]. The trunk is kept between episodes (warm
start); only the noisy layers are redrawn.

Resolution r is produced by the first stage whose map is at least r wide (cheaper for low r), through
that stage's head (`output="heads"`), or by the last stage's head resized (`output="resize"`); a map
that is not exactly r wide is resized bilinearly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NoisyLayerGenerator(nn.Module):
    def __init__(
        self,
        embeddings: torch.Tensor,
        resolutions: list[int],
        out_chans: int,
        batch_size: int,
        ngf: int = 64,
        noise_dim: int = 1000,
        init_size: int = 4,
        output: str = "heads",
    ) -> None:
        super().__init__()
        num_classes, embed_dim = embeddings.shape
        self.register_buffer("embeddings", embeddings.detach().clone().float())
        self.resolutions = sorted(resolutions)
        self.init_size = init_size
        self.output = output
        self.num_classes = num_classes
        self.embed_norm = nn.BatchNorm1d(embed_dim)
        self.noisy_layers = nn.ModuleList(
            nn.Linear(embed_dim, noise_dim) for _ in range(math.ceil(batch_size / num_classes))
        )
        self.project = nn.Linear(noise_dim, 2 * ngf * init_size**2)
        self.stem_norm = nn.BatchNorm2d(2 * ngf)
        num_stages = max(1, math.ceil(math.log2(max(self.resolutions) / init_size)))
        widths = [2 * ngf] * num_stages + [ngf]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[i + 1]),
                nn.LeakyReLU(0.2, inplace=True),
            )
            for i in range(num_stages)
        )
        head_stages = sorted({self.stage_for(r) for r in self.resolutions})
        self.heads = nn.ModuleDict(
            {str(s): nn.Conv2d(widths[s + 1], out_chans, 3, padding=1) for s in head_stages}
        )
        self.redraw_noise()

    def stage_for(self, resolution: int) -> int:
        """Index of the trunk stage whose output feeds `resolution`."""
        if self.output == "resize":
            return len(self.stages) - 1
        stage = max(0, math.ceil(math.log2(resolution / self.init_size)) - 1)
        return min(stage, len(self.stages) - 1)

    @torch.no_grad()
    def redraw_noise(self, generator: torch.Generator | None = None) -> None:
        """Fresh N(0,1) noisy layers: the source of sample diversity between episodes."""
        for layer in self.noisy_layers:
            weight = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.copy_(weight.to(layer.weight.device))
            nn.init.zeros_(layer.bias)

    def trunk_parameters(self) -> list[nn.Parameter]:
        noisy = {id(p) for p in self.noisy_layers.parameters()}
        return [p for p in self.parameters() if id(p) not in noisy]

    def forward(self, labels: torch.Tensor, resolution: int) -> torch.Tensor:
        if resolution not in self.resolutions:
            raise ValueError(f"resolution {resolution} is not in the generator's set {self.resolutions}")
        codes = self.embed_norm(self.embeddings[labels])
        chunks = codes.split(self.num_classes)
        if len(chunks) > len(self.noisy_layers):
            raise ValueError(f"batch of {len(labels)} exceeds the generator's batch size "
                             f"{len(self.noisy_layers) * self.num_classes}")
        hidden = torch.cat([layer(chunk) for layer, chunk in zip(self.noisy_layers, chunks)])
        x = self.project(hidden).view(len(labels), -1, self.init_size, self.init_size)
        x = self.stem_norm(x)
        last = self.stage_for(resolution)
        for stage in self.stages[: last + 1]:
            x = stage(x)
        image = torch.sigmoid(self.heads[str(last)](x))
        if image.shape[-1] != resolution:
            image = F.interpolate(image, size=(resolution, resolution), mode="bilinear",
                                  align_corners=False, antialias=image.shape[-1] > resolution)
        return image


def class_cycle(batch_size: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels 0..K-1 repeated: each noisy layer gets one copy of every class (NAYER)."""
    return torch.arange(batch_size, device=device) % num_classes
