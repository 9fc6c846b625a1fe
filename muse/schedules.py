"""Resolution schedules: which resolution the next synthesis episode uses (MUSE).

`fixed` always the first resolution; `cycle` walks the set in order, episode by episode; `random`
draws with `weights` (uniform by default), reproducibly from (seed, episode); `progressive` moves from
the lowest to the highest resolution in equal spans of the run's epochs.
"""

from __future__ import annotations

import numpy as np

from muse.config import ResolutionConfig


class ResolutionSchedule:
    def __init__(self, cfg: ResolutionConfig, total_epochs: int, seed: int = 0) -> None:
        self.kind = cfg.schedule
        self.resolutions = list(cfg.set)
        weights = np.asarray(cfg.weights if cfg.weights is not None else [1.0] * len(self.resolutions))
        self.probabilities = weights / weights.sum()
        self.total_epochs = max(1, total_epochs)
        self.seed = seed

    def resolution(self, epoch: int, episode: int) -> int:
        """Resolution for global synthesis `episode` (0, 1, …) that falls in `epoch`."""
        if self.kind == "fixed":
            return self.resolutions[0]
        if self.kind == "cycle":
            return self.resolutions[episode % len(self.resolutions)]
        if self.kind == "random":
            rng = np.random.default_rng([self.seed, episode])
            return int(rng.choice(self.resolutions, p=self.probabilities))
        span = min(len(self.resolutions) - 1, epoch * len(self.resolutions) // self.total_epochs)
        return self.resolutions[span]
