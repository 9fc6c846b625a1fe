"""`muse export`: a run's student as a file other tools load without muse's run machinery.

- `timm`: the plain timm state dict (`<arch>.pth`), for
  `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=K), in_chans=C)`;
- `safetensors`: a folder in timm's Hugging Face layout (`config.json` + `model.safetensors`, written by
  `timm.models.save_for_hf`), for `timm.create_model("local-dir:FOLDER", pretrained=True)` or
  `safetensors.torch.load_file`;
- `torchscript`: `<arch>.torchscript.pt`, for `torch.jit.load` (no timm or muse needed).

Our own architectures (`digits_cnn`, `lenet5`, ...) are registered with timm by `import muse.models`;
timm's own (e.g. `resnet18`) need nothing more than timm.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from timm.models import save_for_hf

from muse.config import ConfigError, load_config
from muse.data import load_dataset
from muse.io import atomic_write
from muse.saved_models import SavedClassifier, load_classifier

FORMATS = ("timm", "safetensors", "torchscript")


def load_run_student(run_dir: Path) -> SavedClassifier:
    """The student of a finished run folder (`student.pt`; a student saved before its file recorded the
    dataset facts is matched against the run's `config.yaml`)."""
    run_dir = Path(run_dir)
    path = run_dir / "student.pt"
    if not (run_dir / "summary.json").is_file() or not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a finished run folder (no summary.json and student.pt): "
                          "give the output_dir of a completed `muse distill` or `orchestration/run.py` run")
    payload_meta = torch.load(path, map_location="cpu", weights_only=True).get("meta")
    if payload_meta:
        return load_classifier(path)
    cfg = load_config(str(run_dir / "config.yaml"), [])
    return load_classifier(path, arch=cfg.student.arch, info=load_dataset(cfg.data).info)


def export_student(run_dir: Path, fmt: str, out: Path | None = None) -> tuple[Path, SavedClassifier]:
    """Write the run's student in format `fmt` (see the module docstring) to `out` (default: the run's
    `export/` folder); returns where it went and the student."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    saved = load_run_student(run_dir)
    return _write(saved, fmt, Path(run_dir) / "export", out), saved


def _write(saved: SavedClassifier, fmt: str, export_dir: Path, out: Path | None) -> Path:
    model, arch = saved.model, saved.arch
    if fmt == "timm":
        target = Path(out or export_dir / f"{arch}.pth")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return atomic_write(target, lambda tmp: torch.save(state, tmp))
    if fmt == "torchscript":
        target = Path(out or export_dir / f"{arch}.torchscript.pt")
        scripted = torch.jit.script(model)
        return atomic_write(target, lambda tmp: torch.jit.save(scripted, str(tmp)))
    target = Path(out or export_dir / arch)
    return _write_folder(target, lambda folder: save_for_hf(model, str(folder), safe_serialization=True))


def _write_folder(target: Path, write: object) -> Path:
    """Fill a temporary folder beside `target`, then move it into place (replacing an earlier export)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)  # type: ignore[operator]
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_snippet(fmt: str, path: Path, saved: SavedClassifier) -> str:
    """How to load the export, for the command's output."""
    m, path = saved.meta, Path(path).resolve()
    register = "import muse.models  # registers muse's architectures with timm\n" if _is_ours(saved.arch) else ""
    if fmt == "timm":
        return (f"import timm\n{register}model = timm.create_model({saved.arch!r}, pretrained=True, in_chans={m['in_chans']}, "
                f"num_classes={m['num_classes']},\n    pretrained_cfg_overlay=dict(file={str(path)!r}, "
                f"num_classes={m['num_classes']})).eval()")
    if fmt == "safetensors":
        return f"import timm\n{register}model = timm.create_model({f'local-dir:{path}'!r}, pretrained=True).eval()"
    return f"import torch\nmodel = torch.jit.load({str(path)!r}).eval()"


def _is_ours(arch: str) -> bool:
    from muse.models import MODEL_NAMES

    return arch in MODEL_NAMES
