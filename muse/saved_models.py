"""Saved classifiers read back as plain timm models: a run's `student.pt`, a `muse train-teacher`
checkpoint, or a user's plain state dict (`.pt`/`.pth`, or `.safetensors` as `muse export` writes).
Everything is loaded with `weights_only=True` (or safetensors), never by unpickling code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import muse.models  # noqa: F401  (registers our architectures with timm)
from muse.config import ConfigError, error_summary
from muse.data import DatasetInfo

STUDENT_FORMAT = "muse-student-v1"
TEACHER_FORMAT = "muse-teacher-v1"
_BACKBONE = "backbone."  # StudentNet's timm model; the other keys are the projection head P


@dataclass(frozen=True)
class SavedClassifier:
    model: nn.Module  # the plain timm classifier, in eval mode
    arch: str
    kind: str  # "student", "teacher" or "state dict"
    meta: dict[str, Any]  # arch, num_classes, in_chans; dataset, class_names, mean, std... when recorded


def classifier_meta(arch: str, info: DatasetInfo) -> dict[str, Any]:
    """The facts a saved classifier carries so it can be rebuilt and fed without its run."""
    return {"arch": arch, "dataset": info.name, "num_classes": info.num_classes,
            "class_names": list(info.class_names), "in_chans": info.in_chans, "mean": list(info.mean),
            "std": list(info.std), "resolution": info.resolution}


def backbone_state(student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain timm model's weights inside a StudentNet state dict (`backbone.*`, prefix removed)."""
    return {k[len(_BACKBONE):]: v for k, v in student_state.items() if k.startswith(_BACKBONE)}


def load_classifier(path: Path, *, arch: str | None = None, info: DatasetInfo | None = None,
                    arch_field: str = "--arch") -> SavedClassifier:
    """Read `path` as a classifier. Architecture, class count and channels come from the file when it
    records them (student.pt, teacher.pt), else from `arch` and `info`. A recorded architecture must be
    `arch` (when given; `arch_field` names where it was set), and when `info` is given the classifier must
    fit that dataset (classes and channels); a mismatch is a `ConfigError` naming both."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} not found (or not a file): give a run's student.pt, a "
                          "teacher checkpoint, or an exported .pth/.safetensors file")
    payload = _read(path)
    if isinstance(payload, dict) and payload.get("format") == TEACHER_FORMAT:
        kind, meta, state = "teacher", dict(payload["meta"]), payload["state_dict"]
    elif isinstance(payload, dict) and "state_dict" in payload and "arch" in payload:  # student.pt
        kind, meta, state = "student", dict(payload.get("meta", {})), backbone_state(payload["state_dict"])
        meta.setdefault("arch", payload["arch"])
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        kind, meta, state = "state dict", {}, payload
    else:
        raise ConfigError(f"checkpoint {str(path)!r} is neither a muse student/teacher checkpoint nor a state "
                          "dict of tensors")
    if arch is not None and meta.get("arch", arch) != arch:
        raise ConfigError(f"checkpoint {str(path)!r}: architecture is {meta['arch']!r} but {arch_field} is {arch!r}")
    meta.setdefault("arch", arch)
    if meta["arch"] is None:
        raise ConfigError(f"checkpoint {str(path)!r} is a plain state dict and does not name its architecture: "
                          f"set {arch_field} to its timm model name")
    if info is not None:  # what the file does not record is taken from the dataset it is used with
        _check_fits(path, meta, info)
        meta.setdefault("num_classes", info.num_classes)
        meta.setdefault("in_chans", info.in_chans)
    if "num_classes" not in meta or "in_chans" not in meta:
        raise ConfigError(f"checkpoint {str(path)!r} does not record its classes and channels: give the dataset "
                          "it belongs to (--config / data.* overrides)")
    model = timm.create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {str(path)!r} does not match architecture {meta['arch']!r}: "
                          f"{str(error).splitlines()[0]}") from None
    return SavedClassifier(model.eval(), meta["arch"], kind, meta)


def _read(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for truncated or foreign files
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({error_summary(error)}): is it a torch "
                          "or safetensors file, and complete?") from None


def _check_fits(path: Path, meta: dict[str, Any], info: DatasetInfo) -> None:
    problems = []
    if meta.get("num_classes", info.num_classes) != info.num_classes:
        problems.append(f"it has {meta['num_classes']} classes but dataset {info.name!r} has {info.num_classes}")
    if meta.get("in_chans", info.in_chans) != info.in_chans:
        problems.append(f"it takes {meta['in_chans']} input channels but {info.name!r} has {info.in_chans}")
    if problems:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the dataset: " + "; ".join(problems)
                          + " (set --config or data.* to the dataset it was trained for)")
