"""How a stage computes: bf16 autocast and the channels_last memory format, chosen per stage in the
config (`<stage>.precision=bf16`, `<stage>.channels_last=true` for `teacher`, `synthesis` and `distill`).

bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). The networks' forward passes
run under autocast; the losses are computed in fp32 from their outputs (on CPU autocast would leave
`log_softmax` in bf16); backward follows the forward's dtypes, and parameters and optimizer state stay fp32.
channels_last (NHWC) is what cuDNN's and oneDNN's fastest convolution kernels read; it changes layout,
never values."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from muse.config import ComputeOptions


@dataclass(frozen=True)
class Precision:
    autocast: bool  # bf16
    channels_last: bool
    device_type: str  # "cpu", "cuda", ...

    @classmethod
    def of(cls, options: ComputeOptions, device: torch.device) -> Precision:
        return cls(options.precision == "bf16", options.channels_last, device.type)

    def forward_context(self) -> AbstractContextManager:
        """Wrap the networks' forward passes (not the losses, not `backward`, not the optimizer step)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast)

    def model(self, module: nn.Module) -> nn.Module:
        """`module` in this stage's memory format (in place, as `Module.to` is)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A [B,C,H,W] batch in this stage's memory format."""
        if self.channels_last and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images
