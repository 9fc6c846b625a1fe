"""One synthesis episode (NAYER + MUSE): fresh noisy layers and a fresh Adam, `g_steps` generator
updates against the teacher (and the current student), keep the lowest-loss un-augmented batch.

`Synthesizer` holds what persists between episodes (teacher, generator trunk, label embeddings, BN
EMA, RNG) and returns a `SynthesisRecord` of plain numpy arrays, so a Ray actor can ship it as is.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muse.config import ConfigError, RunConfig
from muse.datasets import get_dataset
from muse.generator import NoisyLayerGenerator, class_cycle
from muse.losses import BNStatisticsLoss, adversarial_loss, embedding_distance_loss, key_region_loss
from muse.models import classifier_weight, features_and_logits, supports_cam
from muse.precision import Precision
from muse.student import StudentNet
from muse.transforms import model_input, random_shift_flip



def applicable_key_region(cfg: RunConfig, teacher: nn.Module, in_chans: int, evaluation_resolution: int) -> RunConfig:
    """`cfg`, with MUSE's key-region term switched off (and a warning saying why) when the teacher cannot
    give it a class activation map: no linear classifier directly over its pooled last feature map
    (LeNet-5, ViT, ConvNeXt, MobileNetV3), or a last feature map under 2×2 at the smallest size it sees
    (e.g. a ResNet-18 at 16 px), where "where the evidence lies" has no meaning."""
    if cfg.loss.kr == 0:
        return cfg
    if not supports_cam(teacher):
        reason = (f"teacher {cfg.teacher.arch!r} has no class activation map (its classifier is not one linear "
                  "layer over the average-pooled last feature map)")
    else:
        size = min(cfg.resolution.set) if cfg.resolution.teacher_input == "native" else evaluation_resolution
        device = next(teacher.parameters()).device
        was_training = teacher.training
        with torch.no_grad():
            height, width = teacher.eval().forward_features(torch.zeros(1, in_chans, size, size, device=device)).shape[-2:]
        teacher.train(was_training)
        if height * width >= 4:
            return cfg
        reason = (f"teacher {cfg.teacher.arch!r} has a {height}×{width} last feature map at {size} px, too small "
                  "for a key region")
    print(f"warning: loss.kr={cfg.loss.kr} switched off (loss.kr=0): {reason}", file=sys.stderr)
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"kr": 0.0})})

@dataclass
class SynthesisRecord:
    """A batch of synthetic images with everything distillation and bookkeeping need."""

    images: np.ndarray  # [n, C, r, r], pixel values in [0,1] as uint8 (×255) or float16
    labels: np.ndarray  # [n] int64, the conditioning labels
    teacher_logits: np.ndarray  # [n, K] float32, on the un-augmented images at their teacher input
    resolution: int
    student_version: int = -1  # version of the student weights the episode saw (-1: none)
    step: int = 0  # global synthesis episode counter
    losses: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def pixels(self) -> int:
        return len(self) * self.resolution**2

    def images01(self) -> torch.Tensor:
        """Images as a float tensor in [0,1]."""
        # astype copies: arrays from Ray's object store are read-only, which torch.from_numpy warns about.
        images = torch.from_numpy(self.images.astype(np.float32))
        return images / 255.0 if self.images.dtype == np.uint8 else images


def encode_images(images01: torch.Tensor, dtype: str) -> np.ndarray:
    array = images01.detach().clamp(0, 1).cpu()
    if dtype == "uint8":
        return (array * 255.0).round().to(torch.uint8).numpy()
    return array.to(torch.float16).numpy()


class Synthesizer:
    def __init__(self, cfg: RunConfig, teacher: nn.Module, embeddings: torch.Tensor, in_chans: int,
                 mean: tuple[float, ...], std: tuple[float, ...], eval_resolution: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = Precision.of(cfg.synthesis, self.device)
        self.teacher = self.precision.model(teacher.to(self.device).eval().requires_grad_(False))
        self.embeddings = embeddings.to(self.device)
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)
        self.eval_resolution = eval_resolution
        self.flip = get_dataset(cfg.data.name).flip_safe
        self.num_classes = embeddings.shape[0]
        if cfg.loss.kr > 0 and not supports_cam(self.teacher):  # runners apply `applicable_key_region` first
            raise ConfigError(f"loss.kr > 0 needs a CAM, but teacher {cfg.teacher.arch!r} has no linear classifier "
                              "directly over its pooled feature map; set loss.kr=0")
        self.class_weight = classifier_weight(self.teacher).detach() if cfg.loss.kr > 0 else None
        self.bn_loss = BNStatisticsLoss(self.teacher, cfg.loss.bn_momentum)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.generator = self._new_generator()

    def _new_generator(self) -> NoisyLayerGenerator:
        g = self.cfg.generator
        torch.manual_seed(self.cfg.seed + 7919 * self.step)
        generator = NoisyLayerGenerator(self.embeddings.cpu(), self.cfg.resolution.set, self.in_chans,
                                        self.cfg.synthesis.batch_size, g.ngf, g.noise_dim, g.init_size,
                                        g.output).to(self.device)
        return self.precision.model(generator)

    def maybe_rebuild(self, epoch: int) -> bool:
        """Rebuild the generator every `g_life` epochs (NAYER): a warm start that has drifted is reset."""
        if epoch > 0 and epoch % self.cfg.synthesis.g_life == 0:
            self.generator = self._new_generator()
            return True
        return False

    def _teacher_input(self, images01: torch.Tensor) -> torch.Tensor:
        resize_to = self.eval_resolution if self.cfg.resolution.teacher_input == "resize" else None
        return self.precision.images(model_input(images01, self.mean, self.std, resize_to))

    def _student_input(self, images01: torch.Tensor) -> torch.Tensor:
        resize_to = self.eval_resolution if self.cfg.resolution.student_input == "resize" else None
        return self.precision.images(model_input(images01, self.mean, self.std, resize_to))

    def episode(self, resolution: int, student: StudentNet | None = None, student_version: int = -1,
                adversarial: bool = False) -> SynthesisRecord:
        """Synthesise one batch at `resolution`. With `adversarial` (after warm-up) and a student, the
        adversarial and embedding-diversity terms are on."""
        started = time.perf_counter()
        cfg, weights = self.cfg.synthesis, self.cfg.loss
        labels = class_cycle(cfg.batch_size, self.num_classes, self.device)
        if cfg.source == "noise":
            # N(0, 1) in the network's (normalised) input space, stored as an image in [0, 1].
            noise = torch.randn(cfg.batch_size, self.in_chans, resolution, resolution, generator=self.rng)
            best_images = (noise.to(self.device) * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)).clamp(0, 1)
            best_losses: dict[str, float] = {}
        else:
            use_student = adversarial and student is not None and (weights.adv > 0 or weights.aed > 0)
            if student is not None:
                student.eval().requires_grad_(False)  # the generator's gradients only
            try:
                best_images, best_losses = self._optimise(labels, resolution, student if use_student else None)
            finally:
                if student is not None:
                    student.requires_grad_(True)
        with torch.no_grad(), self.precision.forward_context():
            teacher_logits = self.teacher(self._teacher_input(best_images)).float()
        self.step += 1
        return SynthesisRecord(
            images=encode_images(best_images, self.cfg.pool.image_dtype),
            labels=labels.cpu().numpy().astype(np.int64),
            teacher_logits=teacher_logits.float().cpu().numpy(),
            resolution=resolution,
            student_version=student_version,
            step=self.step - 1,
            losses=best_losses,
            timings={"synthesis_s": time.perf_counter() - started},
        )

    def _optimise(self, labels: torch.Tensor, resolution: int,
                  student: StudentNet | None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, weights = self.cfg.synthesis, self.cfg.loss
        self.generator.redraw_noise(self.rng)
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
        self.generator.train()
        best_total, best_images, best_losses = float("inf"), None, {}
        for _ in range(cfg.g_steps):
            with self.precision.forward_context():  # the networks; every loss below is computed in fp32
                images = self.generator(labels, resolution)
                seen = random_shift_flip(images, flip=self.flip, generator=self.rng) if cfg.augment else images
                self.bn_loss.start(resolution)
                feature_map, teacher_logits = features_and_logits(self.teacher, self._teacher_input(seen))
                student_out = student(self._student_input(seen)) if student is not None else None
            teacher_logits = teacher_logits.float()
            terms = {"bn": self.bn_loss.loss(), "ce": F.cross_entropy(teacher_logits, labels)}
            if weights.kr > 0:
                terms["kr"] = key_region_loss(feature_map.float(), self.class_weight, labels, weights.cam_sigma)
            if student_out is not None:
                student_logits, student_embedding = (out.float() for out in student_out)
                terms["adv"] = adversarial_loss(student_logits, teacher_logits)
                if weights.aed > 0:
                    ed = embedding_distance_loss(student_embedding, self.embeddings, labels, weights.ed_radius)
                    terms["aed"] = -ed
            total = sum(getattr(weights, name) * value for name, value in terms.items())
            if total.item() < best_total:
                best_total, best_images = total.item(), images.detach().float()
                best_losses = {name: value.item() for name, value in terms.items()} | {"total": total.item()}
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        self.bn_loss.update_ema()
        assert best_images is not None
        return best_images, best_losses

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: generator trunk, BN EMA, RNG, episode counter."""
        return {"generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
                "bn_ema": self.bn_loss.state_dict(), "rng": self.rng.get_state(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.bn_loss.load_state_dict(state["bn_ema"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])

    def snapshot(self, epoch: int | None, index: int) -> dict[str, Any]:
        """What a checkpoint saves of a generator (in-process, or GeneratorActor `index`): `state_dict()`
        plus the global torch (and CUDA) RNG the noisy layers are redrawn from, and the last epoch seen.
        A deep copy: on CPU `state_dict` holds live tensors, which the next episode changes in place."""
        state = copy.deepcopy(self.state_dict()) | {"torch_rng": torch.get_rng_state(), "epoch": epoch,
                                                    "index": index}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_snapshot(self, state: dict[str, Any]) -> int | None:
        """Restore a `snapshot` (RNGs included); returns its last epoch seen."""
        self.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return state.get("epoch")
