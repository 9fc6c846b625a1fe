"""One typed schema for a whole run, loaded from YAML plus dotted command-line overrides.

Every section validates itself where it is defined; unknown keys fail. A run config is built by
`load_config(path_or_name, overrides)`: shipped config (or a user's YAML file) → method preset →
`key=value` overrides, then validated once, so every error names the field and the reason.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from muse.datasets import DATASETS, dataset_names, get_dataset
from muse.model_names import MODEL_NAMES


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field and the fix."""


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


# Relative paths are taken from the working directory where the config is loaded, once: Ray Train
# workers and Tune trials run in other working directories, where the same relative path means another file.
RunPath = Annotated[Path, AfterValidator(_absolute)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """The real dataset: used to train the teacher and to evaluate the student, never to distill."""

    name: str = Field("digits", description=f"A registered dataset (muse.datasets): {', '.join(dataset_names())}")
    root: RunPath | None = Field(
        None,
        description="Folder with train.npz/test.npz (mnist, cifar10) or train/ and val/ class folders "
        "(imagefolder). Unused for digits, which ships with scikit-learn.",
    )
    resolution: int | None = Field(
        None, ge=4, le=1024, description="Evaluation resolution; default: the dataset's native one."
    )
    eval_batch_size: int = Field(512, ge=1)

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        get_dataset(value)  # raises UnknownDatasetError (a ValueError) listing the registered names
        return value

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataConfig:
        if self.name != "digits" and self.root is None:
            raise ValueError(f"data.root is required for data.name={self.name!r}: set it to the dataset folder")
        return self


def _device_name(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return name


def _registered_model(name: str) -> str:
    """A timm model name, ours included; an unknown one is refused with the closest names."""
    if name in MODEL_NAMES:  # ours: no need to load timm to know
        return name
    import timm

    import muse.models  # noqa: F401  (registers our architectures with timm)

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() or muse.models.MODEL_NAMES"
        raise ValueError(f"{name!r} is not a timm model name; {hint}")
    return name


class ComputeOptions(Section):
    """How a stage computes (`muse.precision`): layout and precision, never the method."""

    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: mixed precision, forward passes under torch.autocast in bfloat16 (GPUs with bf16, "
        "recent CPUs); parameters, gradients and optimizer state stay fp32")
    channels_last: bool = Field(False, description="Models and image batches in the NHWC memory format (faster "
                                "convolutions on GPUs and oneDNN CPUs; same values)")


class TeacherConfig(ComputeOptions):
    arch: str = Field("digits_cnn", description="timm model name (ours are registered by importing muse.models)")
    _known_arch = field_validator("arch")(_registered_model)
    checkpoint: RunPath | None = Field(
        None, description="Teacher checkpoint; default <output_dir>/../teachers/<data>-<arch>-<key>.pt, the "
        "key a hash of everything that defines the teacher (data, root, resolution, training settings, seed)"
    )
    train_if_missing: bool = Field(True, description="Train and cache the teacher when the checkpoint is absent")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)


class StudentConfig(Section):
    arch: str = "digits_cnn_half"
    _known_arch = field_validator("arch")(_registered_model)


class EmbeddingConfig(Section):
    """Label embeddings (one row per class) that condition the generator and anchor L_ed."""

    source: str = Field("teacher-fc", description="teacher-fc | random | file:PATH.npy")
    dim: int = Field(64, ge=2, description="Row size for source=random (others take the source's width)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in ("teacher-fc", "random"):
            return value
        if value.startswith("file:") and len(value) > 5:  # made absolute like every RunPath
            return f"file:{_absolute(Path(value.removeprefix('file:')))}"
        raise ValueError("must be 'teacher-fc', 'random' or 'file:PATH.npy'")


class GeneratorConfig(Section):
    ngf: int = Field(64, ge=4, description="Trunk width (channels of the last stage; earlier stages use 2·ngf)")
    noise_dim: int = Field(1000, ge=2, description="Width z of the noisy layer")
    init_size: int = Field(4, ge=1, description="Spatial size s0 of the first trunk feature map")
    output: Literal["heads", "resize"] = Field(
        "heads", description="heads: one output conv per trunk stage; resize: last stage resized bilinearly"
    )


class LossConfig(Section):
    bn: float = Field(10.0, ge=0, description="α_bn, BN-statistics loss")
    ce: float = Field(0.5, ge=0, description="α_ce, teacher cross-entropy to the conditioning label")
    adv: float = Field(1.33, ge=0, description="α_adv, adversarial student/teacher disagreement (after warm-up)")
    kr: float = Field(0.5, ge=0, description="α_kr, CAM key-region loss (MUSE)")
    aed: float = Field(0.5, ge=0, description="α_aed, adversarial embedding diversity for the generator (MUSE)")
    ed: float = Field(0.5, ge=0, description="α_ed, student embedding loss toward the class anchor (MUSE)")
    tau: float = Field(20.0, gt=0, description="KD temperature")
    cam_sigma: float = Field(0.25, gt=0, description="σ of the CAM target Gaussian, as a fraction of the map size")
    ed_radius: float = Field(0.1, ge=0, description="r in relu(‖P(f_S(x)) − LE[y]‖² − r)")
    bn_momentum: float = Field(0.9, ge=0, lt=1, description="EMA blend of earlier batches' BN statistics")


ScheduleKind = Literal["fixed", "cycle", "random", "progressive"]


class ResolutionConfig(Section):
    """Which resolutions the generator synthesises at, and in what order (MUSE)."""

    set: list[int] = Field(default_factory=lambda: [8, 16])
    schedule: ScheduleKind = "random"
    weights: list[float] | None = Field(None, description="Sampling weights for schedule=random")
    teacher_input: Literal["native", "resize"] = Field(
        "resize", description="resize: the teacher scores every image resized to the evaluation resolution, "
        "as the student sees it (KD compares the two on the same input); native: at the size it was made "
        "(cheaper, but on digits the teacher's 8 px judgement is not its 16 px one: see README)")
    student_input: Literal["native", "resize"] = "resize"

    @field_validator("set")
    @classmethod
    def _valid_set(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("must name at least one resolution, e.g. [16]")
        if any(r < 4 for r in value):
            raise ValueError(f"resolutions must be ≥ 4 pixels, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"resolutions must be distinct, got {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _weights_match(self) -> ResolutionConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.set):
                raise ValueError(
                    f"resolution.weights has {len(self.weights)} entries but resolution.set has {len(self.set)}"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("resolution.weights must be non-negative with a positive sum")
        return self


class SynthesisConfig(ComputeOptions):
    source: Literal["generator", "noise"] = Field(
        "generator", description="noise: Gaussian noise, N(0,1) in the normalised input space (the floor baseline)"
    )
    batch_size: int = Field(100, ge=2, description="Images per synthesis episode")
    g_steps: int = Field(30, ge=1, description="Generator optimisation steps per episode")
    g_loops: int = Field(2, ge=0, description="Synthesis episodes per epoch after warm-up")
    warmup: int = Field(5, ge=0, description="Warm-up epochs: fill the pool, no distillation")
    gwp_loops: int = Field(5, ge=1, description="Synthesis episodes per warm-up epoch")
    g_life: int = Field(10, ge=1, description="Rebuild the generator every g_life epochs")
    lr_g: float = Field(4e-3, gt=0)
    augment: bool = Field(True, description="Random crop + flip inside the generator loop")


class DistillConfig(ComputeOptions):
    epochs: int = Field(40, ge=1, description="Epochs after warm-up")
    kd_steps: int = Field(20, ge=1, description="Student steps per epoch")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    augment: bool = Field(True, description="Crop/flip pool images; the teacher then re-scores the augmented batch")
    bn_stats: Literal["running", "pool"] = Field(
        "running",
        description="The student's BatchNorm statistics at each evaluation and in the saved student: running "
        "(the running average training leaves, which follows the newest KD batches) or pool (recomputed over "
        "the pool's images just before; training is unchanged)")
    bn_stats_images: int = Field(
        20000, ge=1, description="With bn_stats=pool: at most this many pool images (whole records, drawn "
        "uniformly) to recompute the statistics over")


class BudgetConfig(Section):
    """How much synthesis a run spends. `epochs`: every distillation epoch runs `synthesis.g_loops`
    episodes. `images`, `pixels` or `seconds` (of synthesis): the run spends `amount`, warm-up included,
    spread evenly over its `distill.epochs` epochs (each runs episodes until its share is spent, the last
    episode may overshoot it by less than one episode), so methods with cheaper episodes get more of them
    for the same KD steps. On Ray each Train worker spends its share (amount / workers)."""

    kind: Literal["epochs", "images", "pixels", "seconds"] = "epochs"
    amount: float | None = Field(None, gt=0, description="What the run may spend, in `kind` units (not for epochs)")

    @model_validator(mode="after")
    def _amount_when_needed(self) -> BudgetConfig:
        if self.kind == "epochs" and self.amount is not None:
            raise ValueError("budget.amount is for kind images, pixels or seconds; set budget.kind, or drop the amount")
        if self.kind != "epochs" and self.amount is None:
            raise ValueError(f"budget.kind={self.kind} needs budget.amount, e.g. budget.amount=2e6")
        return self


class PoolConfig(Section):
    capacity: int = Field(20000, ge=1, description="Most images kept; the oldest are dropped first")
    directory: RunPath | None = Field(None, description="Parquet shard folder; default <output_dir>/pool")
    image_dtype: Literal["uint8", "float16"] = "uint8"


class GeneratorsConfig(Section):
    """The GeneratorActor pool: each actor holds a teacher, a generator and label embeddings."""

    count: int = Field(1, ge=1, description="Number of GeneratorActors")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (fractions allowed, e.g. 0.25)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractional shares one GPU, e.g. 0.25")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources per actor, e.g. {generator_node: 1} to pin them")


class TrainWorkersConfig(Section):
    """The Ray Train workers that run the distillation step (DDP over the student)."""

    count: int = Field(1, ge=0, description="Train workers; 0 runs the loop in the driver (Train local mode)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Train worker")
    use_gpu: bool = Field(False, description="One GPU per Train worker")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources per Train worker, e.g. {trainer_node: 1}")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Train's own console lines; INFO adds a line per report and per checkpoint")
    max_failures: int = Field(
        3, ge=-1, description="Worker-group failures (a worker process or node lost) Ray Train recovers from by "
        "restarting the group from the last committed checkpoint; 0 fails the run at the first, -1 never gives up")


class FeedConfig(Section):
    """The pull feed each Train worker uses to get synthetic batches from the generators."""

    in_flight: int = Field(
        2, ge=1,
        description="generate() calls each Train worker keeps in flight (K); with W workers and N actors, "
        "W·K ≥ N keeps every actor busy",
    )
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for one batch before the feed gives up")


class WeightsConfig(Section):
    """Student weights from rank 0 to the generators (for L_adv / L_aed), and what to do with stale batches."""

    push_interval: int = Field(10, ge=1, description="Rank 0 pushes the student every this many steps")
    max_staleness: int = Field(
        100, ge=0,
        description="Most student steps a batch's weights may lag the current student before it counts as stale",
    )
    on_stale: Literal["use", "drop"] = Field(
        "use", description="use: keep stale batches (they are counted); drop: discard them"
    )


class RayConfig(Section):
    """How a run is placed on Ray (used by `orchestration/`; the single-process engine ignores it).
    Versions count student optimizer steps: rank 0 pushes its weights with `version=steps` every
    `weights.push_interval` steps, and a batch's staleness is `steps − batch.student_version`."""

    address: str | None = Field(
        None,
        description="ray.init address: None joins the job's cluster when run under `ray job submit`, "
        "else starts a local one; 'local' always starts a new local cluster; 'auto' or host:port joins one",
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, description="Seconds to reach the cluster at ray.address / RAY_ADDRESS before the run stops "
        "with an error (Ray itself would retry for minutes)")
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig)
    train: TrainWorkersConfig = Field(default_factory=TrainWorkersConfig)
    feed: FeedConfig = Field(default_factory=FeedConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)


class TrackingConfig(Section):
    """MLflow tracking of the run (params, per-epoch metrics, artifacts)."""

    enabled: bool = Field(True, description="Log the run to MLflow")
    uri: str | None = Field(None, description="Tracking URI; default sqlite:///<output_dir>/mlflow.db")
    experiment: str = Field("muse", min_length=1, description="MLflow experiment name")
    required: bool = Field(True, description="false: an unreachable store only warns and the run goes on untracked")
    timeout_s: int = Field(10, ge=1, le=300, description="Seconds an MLflow server may take to answer a request "
                           "before the store counts as unreachable (MLFLOW_HTTP_REQUEST_TIMEOUT)")


class RunConfig(Section):
    method: Literal["muse", "nayer"] = Field("muse", description="Preset applied under the file's values")
    seed: int = 0
    device: Annotated[str, AfterValidator(_device_name)] = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    output_dir: RunPath = Field(Path("runs/default"), validate_default=True)
    checkpoint_every: int = Field(
        5, ge=1, description="Checkpoint into output_dir every this many epochs (and at the last or stop epoch)")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    resolution: ResolutionConfig = Field(default_factory=ResolutionConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _runnable(self) -> RunConfig:
        """What no single field shows: resolutions the student is evaluated at, and a run that synthesises."""
        spec = DATASETS[self.data.name]
        evaluation = self.data.resolution or spec.native_resolution
        if max(self.resolution.set) > evaluation:
            raise ValueError(f"resolution.set: {self.resolution.set} goes above the evaluation resolution "
                             f"{evaluation} of {self.data.name!r}: synthesise at or below it (or raise "
                             "data.resolution)")
        if self.synthesis.warmup == 0 and self.synthesis.g_loops == 0 and self.budget.kind == "epochs":
            raise ValueError("synthesis: warmup=0 and g_loops=0 synthesise nothing, so there is nothing "
                             "to distil from: raise one of them (or give a budget)")
        return self

    @property
    def total_epochs(self) -> int:
        """Warm-up epochs (pool filling only) plus distillation epochs."""
        return self.synthesis.warmup + self.distill.epochs

    @property
    def teacher_checkpoint(self) -> Path:
        """`teacher.checkpoint`, or the cache file of the teacher this config trains: another dataset root,
        resolution, training setting or seed is another file, never a stale teacher."""
        if self.teacher.checkpoint is not None:
            return self.teacher.checkpoint
        # Compute options at their defaults stay out of the key, so teachers cached before they existed still count.
        default_compute = {name for name, field in ComputeOptions.model_fields.items()
                           if getattr(self.teacher, name) == field.default}
        defining = {"data": self.data.model_dump(mode="json", exclude={"eval_batch_size"}), "seed": self.seed,
                    "teacher": self.teacher.model_dump(mode="json",
                                                       exclude={"checkpoint", "train_if_missing", *default_compute})}
        key = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]
        return self.output_dir.parent / "teachers" / f"{self.data.name}-{self.teacher.arch}-{key}.pt"

    @property
    def pool_directory(self) -> Path:
        return self.pool.directory if self.pool.directory is not None else self.output_dir / "pool"

    def flat(self) -> dict[str, Any]:
        """Dotted key → value, e.g. {"loss.kr": 0.5}: for tracking params and sweeps."""
        return _flatten(self.model_dump(mode="json"))


# Method presets: the NAYER baseline is the MUSE engine with its three additions switched off.
# `None` means "the dataset's evaluation resolution" (data.resolution, else its native one), filled in by
# `load_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "muse": {},
    "nayer": {"resolution.set": None, "resolution.schedule": "fixed", "resolution.weights": None,
              "loss.kr": 0.0, "loss.aed": 0.0, "loss.ed": 0.0},
}


# MUSE with one of its additions off, by name (for equal-compute comparisons, e.g. benchmarks/quality.py):
# `muse-no-kr`, `muse-no-ed`, `muse-no-aed`, and `muse-at-R` for each resolution R of the run's set (a
# single resolution, the multi-resolution addition off).
ABLATIONS: dict[str, dict[str, Any]] = {
    "muse-no-kr": {"loss.kr": 0.0},
    "muse-no-ed": {"loss.ed": 0.0},
    "muse-no-aed": {"loss.aed": 0.0},
}


def ablation_names(cfg: RunConfig) -> list[str]:
    """Every ablation of `cfg` (a MUSE config), each addition off in turn."""
    return [*ABLATIONS, *(f"muse-at-{r}" for r in cfg.resolution.set)]


def ablation(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with the ablation `name` applied (see `ABLATIONS`)."""
    if name in ABLATIONS:
        return with_overrides(cfg, ABLATIONS[name])
    resolution = name.removeprefix("muse-at-")
    if name.startswith("muse-at-") and resolution.isdigit() and int(resolution) in cfg.resolution.set:
        return with_overrides(cfg, {"resolution.set": [int(resolution)], "resolution.schedule": "fixed",
                                    "resolution.weights": None})
    raise ConfigError(f"unknown ablation {name!r}; choose one of {ablation_names(cfg)}")


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a run config. `source`: a YAML path, a shipped name (`digits`), or None."""
    raw = _read_source(source)
    cli = parse_overrides(overrides or [])
    method = cli.get("method", raw.get("method", "muse"))
    if method not in PRESETS:
        raise ConfigError(f"method: unknown preset {method!r}; choose one of {sorted(PRESETS)}")
    merged = copy.deepcopy(raw)
    for key, value in PRESETS[method].items():
        if value is None and key == "resolution.set":
            data = {**raw.get("data", {}), **{k[5:]: v for k, v in cli.items() if k.startswith("data.")}}
            name = data.get("name", DataConfig.model_fields["name"].default)
            spec = DATASETS.get(name) if isinstance(name, str) else None
            if not data.get("resolution") and spec is None:
                continue  # an unknown data.name, which validation below reports
            value = [data.get("resolution") or spec.native_resolution]
        _set_dotted(merged, key, value)
    for key, value in cli.items():
        _set_dotted(merged, key, value)
    return validate_config(merged)


def error_summary(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors (library messages can run to pages)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def with_overrides(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`cfg` with dotted fields replaced, e.g. {"loss.kr": 2.0}, validated again (no preset re-applied)."""
    tree = cfg.model_dump(mode="json")
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return validate_config(tree)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["loss.kr=2.0", "resolution.set=[8,16]"]` → {"loss.kr": 2.0, ...}; values are parsed as YAML."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. loss.kr=2.0")
        parsed[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return parsed


def typed_overrides(items: list[str]) -> list[str]:
    """Overrides as a user typed them: the last value of a field given more than once wins, as in every
    layered config, and a warning names it (scripts layer overrides on purpose; a person rarely does)."""
    last: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() in last:
            print(f"warning: {key.strip()} is given more than once; the last value ({value}) is used", file=sys.stderr)
        last[key.strip()] = value
    return items


def shipped_configs() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("muse.configs").iterdir()
                  if p.name.endswith(".yaml"))


def _read_source(source: str | Path | None) -> dict[str, Any]:
    if source is None:
        return {}
    path = Path(source)
    if not path.exists() and str(source) in shipped_configs():
        text = resources.files("muse.configs").joinpath(f"{source}.yaml").read_text()
    elif path.is_file():
        text = path.read_text()
    else:
        raise ConfigError(f"config {str(source)!r} is neither a file nor a shipped config ({shipped_configs()})")
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {str(source)!r} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {str(source)!r} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling; `muse show-config` lists every field)"
        if item["loc"]:
            lines.append(f"{field}: {reason} (got {item.get('input')!r})")
        else:  # a check across fields: the message names them, the input is the whole config
            lines.append(reason)
    return "invalid config:\n  " + "\n  ".join(lines)
