"""One distillation step: the student matches the teacher on a pool batch (KD at temperature τ) and
pulls its projected embedding toward the class anchor (α_ed·L_ed, MUSE)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from muse.config import RunConfig
from muse.datasets import get_dataset
from muse.losses import embedding_distance_loss, kd_loss
from muse.pool import PoolBatch
from muse.precision import Precision
from muse.synthesis import SynthesisRecord
from muse.student import StudentNet
from muse.transforms import model_input, random_shift_flip


def cosine_schedule(total_steps: int):
    """LR multiplier: cosine from 1 to 0 over `total_steps` (the KD steps after warm-up)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


class Distiller:
    def __init__(self, cfg: RunConfig, student: StudentNet, teacher: nn.Module, embeddings: torch.Tensor,
                 mean: tuple[float, ...], std: tuple[float, ...], eval_resolution: int,
                 device: torch.device | str = "cpu",
                 parallel: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = Precision.of(cfg.distill, self.device)
        self.student = self.precision.model(student.to(self.device))
        # What the forward pass runs: the student itself, or a data-parallel wrapper of it (DDP); the
        # bare student is what gets checkpointed and shipped to the generators.
        self.model = parallel(self.student) if parallel is not None else self.student
        self.teacher = self.precision.model(teacher.to(self.device).eval().requires_grad_(False))
        self.embeddings = embeddings.to(self.device)
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)
        self.eval_resolution = eval_resolution
        self.flip = get_dataset(cfg.data.name).flip_safe
        d = cfg.distill
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=d.lr, momentum=d.momentum,
                                         weight_decay=d.weight_decay)
        total_steps = d.epochs * d.kd_steps  # the KD steps of the run (none in warm-up)
        multiplier = cosine_schedule(total_steps) if d.lr_schedule == "cosine" else (lambda _step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
        self.rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.steps = 0

    def step(self, batches: PoolBatch | list[PoolBatch]) -> dict[str, float]:
        """One SGD step on a pool batch (or a mixed-resolution batch, one part per resolution, which
        needs `student_input=resize`); returns the loss terms."""
        parts = [self._prepare(b) for b in (batches if isinstance(batches, list) else [batches])]
        student_inputs, teacher_logits, labels = (torch.cat(column) for column in zip(*parts))
        self.model.train()
        with self.precision.forward_context():  # the network; the losses are computed in fp32
            outputs = self.model(self.precision.images(student_inputs))
        student_logits, embedding = (out.float() for out in outputs)
        terms = {"kd": kd_loss(student_logits, teacher_logits, self.cfg.loss.tau)}
        if self.cfg.loss.ed > 0:
            terms["ed"] = embedding_distance_loss(embedding, self.embeddings, labels, self.cfg.loss.ed_radius)
        total = terms["kd"] + self.cfg.loss.ed * terms.get("ed", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        return {name: value.item() for name, value in terms.items()}

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _prepare(self, batch: PoolBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student input, teacher logits and labels for one single-resolution batch."""
        images = self._pixels01(batch.images)
        if self.cfg.distill.augment:
            images = random_shift_flip(images, flip=self.flip, generator=self.rng)
            teacher_resize = self.eval_resolution if self.cfg.resolution.teacher_input == "resize" else None
            with torch.no_grad(), self.precision.forward_context():
                teacher_logits = self.teacher(self.precision.images(
                    model_input(images, self.mean, self.std, teacher_resize)))
        else:
            teacher_logits = torch.from_numpy(batch.teacher_logits).to(self.device)
        labels = torch.from_numpy(batch.labels).to(self.device)
        return self._student_view(images), teacher_logits.float(), labels

    def recalibrate_bn(self, records: Sequence[SynthesisRecord], student: StudentNet | None = None) -> None:
        """Set the BatchNorm running statistics of the student (or of `student`, e.g. a copy) to the exact
        mean and variance over `records` (un-augmented, at the size the student sees them; one batch per
        record), in place of the running average that training leaves, which follows the newest KD batches.
        Training is unchanged: in train mode BatchNorm normalises with each batch's own statistics."""
        batches = [self.student_input(record.images) for record in records]
        torch.optim.swa_utils.update_bn(batches, (student or self.student).backbone)

    def student_input(self, images: np.ndarray) -> torch.Tensor:
        """Pool images (uint8 or float [0,1]) as the student's input, without augmentation."""
        return self._student_view(self._pixels01(images))

    def _pixels01(self, images: np.ndarray) -> torch.Tensor:
        """Pool images as float pixels in [0,1] on the device."""
        pixels = torch.from_numpy(images).to(self.device).float()
        return pixels / 255.0 if images.dtype == np.uint8 else pixels

    def _student_view(self, images01: torch.Tensor) -> torch.Tensor:
        resize = self.eval_resolution if self.cfg.resolution.student_input == "resize" else None
        return model_input(images01, self.mean, self.std, resize)

    def state_dict(self) -> dict[str, Any]:
        student = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        return {"student": student, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": self.rng.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.set_state(state["rng"])
        self.steps = int(state["steps"])
