"""The student: any timm classifier plus a projection head P into the label-embedding space, which the
embedding-diversity losses (L_ed for the student, L_aed for the generator) compare with LE[y]."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import muse.models  # noqa: F401  (registers our architectures with timm)
from muse.models import embedding_dim, features_and_logits, pooled_embedding


class StudentNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.backbone = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)
        self.projection = nn.Linear(embedding_dim(self.backbone), embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K] and the L2-normalised projected embedding [B, d]."""
        feature_map, logits = features_and_logits(self.backbone, x)
        embedding = F.normalize(self.projection(pooled_embedding(self.backbone, feature_map)), dim=1)
        return logits, embedding
