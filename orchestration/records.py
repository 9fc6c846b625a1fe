"""SynthesisRecord ⇄ plain dict (numpy arrays and scalars), the form a GeneratorActor ships: Ray stores
numpy arrays zero-copy, and a plain dict needs no class import to read back."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from muse.synthesis import SynthesisRecord

RECORD_FIELDS = tuple(f.name for f in fields(SynthesisRecord))


def record_to_dict(record: SynthesisRecord, **extra: Any) -> dict[str, Any]:
    """The record's fields as a dict (arrays not copied), plus `extra` keys (e.g. actor index, epoch)."""
    return {name: getattr(record, name) for name in RECORD_FIELDS} | extra


def record_from_dict(payload: dict[str, Any], copy: bool = False) -> SynthesisRecord:
    """Rebuild a record from `record_to_dict` output; keys that are not record fields are ignored.

    Arrays fetched with `ray.get` are read-only views of the object store and keep that object pinned
    while referenced; `copy=True` gives writable arrays that own their memory.
    """
    arrays = {name: np.array(payload[name], copy=True) if copy else payload[name]
              for name in ("images", "labels", "teacher_logits")}
    return SynthesisRecord(
        **arrays,
        resolution=int(payload["resolution"]),
        student_version=int(payload.get("student_version", -1)),
        step=int(payload.get("step", 0)),
        losses=dict(payload.get("losses", {})),
        timings=dict(payload.get("timings", {})),
    )
