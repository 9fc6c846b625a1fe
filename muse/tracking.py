"""MLflow tracking for a run: the flattened config as params, per-epoch metrics, and artifacts (config,
summary, student checkpoint, one image grid per resolution per evaluation).

The embedded default is an sqlite store in the run's output directory with an absolute artifact
location (`tracking.uri` unset); `tracking.uri=http://host:port` logs to a server. `NullTracker`
stands in when tracking is off, so the engine never branches on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from muse.config import ConfigError, RunConfig


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_image_grids(self, epoch: int, images_by_resolution: dict[int, np.ndarray]) -> None: ...

    def finish(self, files: list[Path], status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_name: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.mlflow = mlflow
        output_dir = cfg.output_dir.resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        uri = cfg.tracking.uri or f"sqlite:///{output_dir / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
            experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
                cfg.tracking.experiment, artifact_location=(output_dir / "mlartifacts").as_uri())
        except Exception as error:  # MLflow raises several types for an unreachable or broken store
            raise ConfigError(f"tracking.uri {uri!r} is not reachable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}); start the server, fix tracking.uri, or "
                              "set tracking.required=false to continue without tracking") from None
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or output_dir.name)
        self.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        self.mlflow.log_metrics(numeric, step=epoch)

    def log_image_grids(self, epoch: int, images_by_resolution: dict[int, np.ndarray]) -> None:
        """One PNG grid per resolution of synthetic images (uint8 or float in [0,1], [n, C, r, r])."""
        with tempfile.TemporaryDirectory() as tmp:
            for resolution, images in images_by_resolution.items():
                tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
                if images.dtype == np.uint8:
                    tensor = tensor / 255.0
                grid = make_grid(tensor[:64], nrow=8, padding=1)
                pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                path = Path(tmp) / f"epoch{epoch:04d}-{resolution}px.png"
                Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(path)
                self.mlflow.log_artifact(str(path), artifact_path="images")

    def finish(self, files: list[Path], status: str = "FINISHED") -> None:
        for path in files:
            if Path(path).exists():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run(status=status)


def create_tracker(cfg: RunConfig, run_name: str | None = None) -> NullTracker:
    """The run's tracker: MLflow when `tracking.enabled`, else a no-op. An unreachable store is an
    error unless `tracking.required=false`, which continues without tracking and says so."""
    if not cfg.tracking.enabled:
        return NullTracker()
    try:
        return MlflowTracker(cfg, run_name)
    except ConfigError as error:
        if cfg.tracking.required:
            raise
        print(f"warning: continuing WITHOUT tracking: {error}")
        return NullTracker()
