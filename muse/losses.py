"""Every loss of the method, each defined once: generator terms (BN statistics, CE, adversarial,
key region, adversarial embedding diversity) and student terms (KD with temperature, L_ed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muse.models import class_activation_map


class BNStatisticsLoss:
    """DeepInversion's feature-statistics loss over every BatchNorm2d of `model`, via forward hooks.

    Per layer: ‖μ_run − μ̂‖₂ + ‖σ²_run − σ̂²‖₂, where μ̂, σ̂² are the batch statistics (biased variance
    over N, H, W) blended with an EMA of earlier episodes' statistics (NAYER, `momentum`). The EMA is
    kept per resolution (ours): activations of a 8×8 image are not distributed like those of a 32×32.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.key: Any = None
        self.active = False  # the teacher also runs outside synthesis (scoring, distillation)
        self.ema: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._terms: list[torch.Tensor] = []
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self._layers:
            raise ValueError("the BN-statistics loss needs a teacher with BatchNorm2d layers")
        for layer in self._layers:  # kept for the teacher's life: they do nothing while inactive
            layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if not self.active:
            return
        x = inputs[0].float()  # bf16 activations under autocast: statistics in fp32, as BatchNorm keeps them
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        self._stats.append((mean, var))
        earlier = self.ema.get(self.key)
        if self.momentum > 0 and earlier is not None:
            ema_mean, ema_var = earlier[len(self._stats) - 1]
            mean = (1 - self.momentum) * mean + self.momentum * ema_mean
            var = (1 - self.momentum) * var + self.momentum * ema_var
        self._terms.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    def start(self, key: Any = None) -> None:
        """Call before each teacher forward; `key` selects the EMA (e.g. the resolution)."""
        self.key = key
        self.active = True
        self._terms, self._stats = [], []

    def stop(self) -> None:
        self.active = False

    def loss(self) -> torch.Tensor:
        if not self._terms:
            raise RuntimeError("no BatchNorm2d statistics recorded: call start() then run the teacher")
        return torch.stack(self._terms).sum()

    def update_ema(self) -> None:
        """Fold the last forward's batch statistics into the EMA of the current key (end of episode)."""
        self.stop()
        current = [(m.detach(), v.detach()) for m, v in self._stats]
        earlier = self.ema.get(self.key)
        if earlier is None:
            self.ema[self.key] = current
        else:
            r = self.momentum
            self.ema[self.key] = [(r * em + (1 - r) * m, r * ev + (1 - r) * v)
                                  for (em, ev), (m, v) in zip(earlier, current)]

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: [(m.cpu(), v.cpu()) for m, v in stats] for k, stats in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self._layers[0].running_mean.device
        self.ema = {k: [(m.to(device), v.to(device)) for m, v in stats] for k, stats in state["ema"].items()}


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-sample KL(softmax(t/τ) ‖ softmax(s/τ)), shape [B]."""
    log_p_student = F.log_softmax(student_logits / tau, dim=1)
    p_teacher = F.softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton's distillation loss: mean KL at temperature τ, scaled by τ² to keep gradients comparable."""
    return kl_divergence(student_logits, teacher_logits, tau).mean() * tau**2


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """−mean[1{argmax S = argmax T}·KL(T‖S)]: the generator seeks samples where S agrees with T but
    their distributions still differ, and pushes them apart (NAYER/Fast)."""
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()
    return -(kl_divergence(student_logits, teacher_logits) * agree).mean()


def gaussian_target(height: int, width: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """2-D Gaussian centred on an h×w grid, peak 1, σ = `sigma`·h (rows) and `sigma`·w (columns)."""
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    gauss_rows = torch.exp(-(rows**2) / (2 * (sigma * height) ** 2))
    gauss_cols = torch.exp(-(cols**2) / (2 * (sigma * width) ** 2))
    return gauss_rows[:, None] * gauss_cols[None, :]


def key_region_loss(feature_map: torch.Tensor, classifier_weight: torch.Tensor, labels: torch.Tensor,
                    sigma: float) -> torch.Tensor:
    """MUSE's key-region loss: the teacher's class activation map for the conditioning label, scaled
    to peak 1, is pulled toward a centred Gaussian, so the class evidence sits in the image centre."""
    cam = class_activation_map(feature_map, classifier_weight, labels)
    target = gaussian_target(cam.shape[-2], cam.shape[-1], sigma, cam.device)
    return ((cam - target) ** 2).mean()


def embedding_distance_loss(embeddings: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor,
                            radius: float) -> torch.Tensor:
    """L_ed = mean relu(‖P(f_S(x)) − LE[y]‖² − r): the student embedding is pulled into a ball of
    radius r around its class anchor. The generator maximises it (L_aed = −L_ed)."""
    distance = ((embeddings - anchors[labels]) ** 2).sum(dim=1)
    return F.relu(distance - radius).mean()
