"""Label embeddings: a fixed K×d matrix, one row per class, that conditions the generator (NAYER)
and anchors the student's embedding-diversity loss (MUSE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muse.config import ConfigError, EmbeddingConfig
from muse.models import classifier_weight


def label_embeddings(cfg: EmbeddingConfig, teacher: torch.nn.Module, num_classes: int, seed: int) -> torch.Tensor:
    """Build the K×d embedding matrix named by `cfg.source` (rows L2-normalised)."""
    if cfg.source == "teacher-fc":
        rows = classifier_weight(teacher).detach().float().cpu()
    elif cfg.source == "random":
        rows = _orthogonal_codes(num_classes, cfg.dim, seed)
    else:
        rows = _load_file(Path(cfg.source.removeprefix("file:")))
    if rows.shape[0] != num_classes:
        raise ConfigError(
            f"embedding.source={cfg.source!r}: has {rows.shape[0]} rows but the teacher has {num_classes} "
            f"classes; give one row per class, in the teacher's class order"
        )
    return F.normalize(rows, dim=1)


def _orthogonal_codes(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.empty(max(num_classes, dim), dim)
    torch.nn.init.orthogonal_(rows, generator=generator)
    return rows[:num_classes]


def _load_file(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"embedding.source: file {str(path)!r} does not exist; give file:PATH.npy of a K×d array")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ConfigError(f"embedding.source: {str(path)!r} is not a readable .npy array ({error})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"embedding.source: {str(path)!r} must hold a 2-D float array (K×d), got "
                          f"shape {array.shape} dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.float32))
