"""A sweep definition (YAML), validated: the base run config, the search space over dotted config
fields, the search algorithm, the trial scheduler, and how many trials run at once.

    name: loss_weights
    config: digits                 # shipped config name or YAML file, as for `muse distill --config`
    overrides: [distill.epochs=20] # applied to every trial
    num_samples: 8
    max_concurrent_trials: 2
    search: {algorithm: optuna, seed: 0}
    scheduler: {kind: asha, grace_period: 2}
    space:
      loss.kr: {loguniform: [0.05, 5.0]}
      resolution.schedule: {choice: [random, cycle]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune

from muse.config import ConfigError, RunConfig, load_config


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class Distribution(Spec):
    """Exactly one of: choice (a list of values), grid (every value, one trial each), uniform / loguniform
    (float bounds [low, high]), randint (int bounds [low, high), high excluded). For PBT, `mutate` may
    list the values an exploit moves between (default: the choice or grid values); PBT moves a
    categorical value to a neighbour in that list, so its order matters."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    mutate: list[Any] | None = Field(None, min_length=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(KINDS)}; got {given or 'none'}")
        kind = given[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"{kind} bounds must be low < high{' and low > 0' if kind == 'loguniform' else ''}; "
                                 f"got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) is not None)

    def extremes(self) -> list[Any]:
        """Every listed value (choice, grid, mutate) or both ends of a range: what a field must accept."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return [*value, *(self.mutate or [])]

    def to_tune(self) -> Any:
        value = getattr(self, self.kind)
        return {"choice": lambda: tune.choice(value), "grid": lambda: tune.grid_search(value),
                "uniform": lambda: tune.uniform(*value), "loguniform": lambda: tune.loguniform(*value),
                "randint": lambda: tune.randint(*value)}[self.kind]()


class SearchSpec(Spec):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: sample the space (grid entries expand); grid: only grid entries; "
                              "optuna: Optuna's TPE through Ray Tune's OptunaSearch")
    seed: int = 0


class SchedulerSpec(Spec):
    kind: Literal["fifo", "asha", "pbt"] = "fifo"
    # ASHA: counted in evaluations (distillation epochs); warm-up epochs are not reported.
    grace_period: int = Field(2, ge=1, description="ASHA: evaluations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    # PBT: a trial trains `perturbation_interval` epochs per segment (the first segment also holds the
    # warm-up), reports with a checkpoint, and may then exploit a better trial and explore its config.
    perturbation_interval: int = Field(2, ge=1, description="PBT: distillation epochs between perturbations")
    synch: bool = Field(False, description="PBT: wait for the whole population at each perturbation")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT: bottom fraction that exploits the top")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: resample instead of perturbing")
    seed: int = 0


class SweepSpec(Spec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    config: str = Field("digits", description="base run config: shipped name or YAML path")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides for every trial")
    output_dir: Path | None = Field(None, description="default runs/sweeps/<name>")
    metric: str = Field("student_acc", pattern=r"^(student_acc|loss_\w+)$",
                        description="a per-evaluation metric: student_acc, or a distillation loss such as loss_kd")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="trials (times each grid combination)")
    max_concurrent_trials: int = Field(1, ge=1, description="capped by what the cluster can hold at once")
    driver_cpus: float = Field(0.1, gt=0, description="CPU reserved for each trial's driver (the Tune function)")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    space: dict[str, Distribution] = Field(min_length=1, description="dotted config field → distribution")

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        kinds = {key: d.kind for key, d in self.space.items()}
        grids = [k for k, kind in kinds.items() if kind == "grid"]
        if self.search.algorithm == "optuna" and grids:
            raise ValueError(f"optuna samples the space itself; make {grids} a choice, or use search.algorithm=grid")
        if self.search.algorithm == "grid" and len(grids) != len(kinds):
            raise ValueError(f"search.algorithm=grid needs every space entry as grid; "
                             f"{sorted(set(kinds) - set(grids))} are not")
        if self.scheduler.kind == "pbt":
            if self.search.algorithm == "optuna":
                raise ValueError("PBT mutates the config itself: use search.algorithm random or grid")
            if self.trial_count < 2:
                raise ValueError("PBT needs a population: num_samples (times the grid size) >= 2")
        elif any(d.mutate for d in self.space.values()):
            raise ValueError("`mutate` lists are for scheduler.kind=pbt")
        return self

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: num_samples times each grid combination."""
        return self.num_samples * math.prod(len(d.grid) for d in self.space.values() if d.grid)

    @property
    def directory(self) -> Path:
        return (self.output_dir or Path("runs/sweeps") / self.name).resolve()

    def param_space(self) -> dict[str, Any]:
        return {key: d.to_tune() for key, d in self.space.items()}

    def clip_to_space(self, config: dict[str, Any]) -> dict[str, Any]:
        """PBT perturbs a continuous value by ×0.8 or ×1.2 without bounds: bring it back into its range."""
        for key, d in self.space.items():
            bounds = d.uniform or d.loguniform or d.randint
            if bounds is not None and key in config:
                low, high = bounds if d.randint is None else (bounds[0], bounds[1] - 1)
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if d.randint is not None else float(value)
        return config

    def pbt_mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations: lists for categorical fields (PBT shifts to a neighbour), domains
        for continuous ones."""
        return {key: d.mutate or d.choice or d.grid or d.to_tune() for key, d in self.space.items()}


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, RunConfig]:
    """The sweep at `path` and its base run config (sweep overrides, then `overrides`, applied). Every
    space field is checked against the run config with each listed value, or both ends of its range."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found; give a YAML file such as sweeps/loss_weights.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {str(path)!r} must hold a mapping (name, config, space, ...)")
    raw.setdefault("name", path.stem)
    config_source = raw.get("config", "digits")
    if isinstance(config_source, str) and not Path(config_source).is_absolute() and (path.parent / config_source).is_file():
        raw["config"] = str(path.parent / config_source)  # a config file beside the sweep file
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'sweep'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"sweep file {str(path)!r}: {problems}") from None
    base_overrides = [*spec.overrides, *(overrides or [])]
    base = load_config(spec.config, base_overrides)
    if base.ray.train.count < 1:
        raise ConfigError(f"sweep file {str(path)!r}: ray.train.count must be >= 1 in a sweep (each trial fits a "
                          "TorchTrainer with its workers; Train's local mode, count 0, does not report to Tune)")
    for key, distribution in spec.space.items():
        for value in distribution.extremes():
            try:
                load_config(spec.config, [*base_overrides, f"{key}={json.dumps(value)}"])
            except ConfigError as error:
                raise ConfigError(f"sweep file {str(path)!r}: space entry {key!r} value {json.dumps(value)} does "
                                  f"not fit the run config: {error}") from None
    return spec, base
