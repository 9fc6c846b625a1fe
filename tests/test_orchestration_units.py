"""The Ray layer's pure parts, in one process without a cluster: config validation, staleness, record
round trips, and a GeneratorActor used as a plain object."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from muse.teacher import ensure_teacher
from orchestration import RayConfig, StalenessPolicy, record_from_dict, record_to_dict, staleness
from orchestration.generator_actor import GeneratorActor, info_to_dict

from conftest import fast_digits_config


def test_orchestration_config_defaults_and_validation():
    cfg = RayConfig.model_validate({"generators": {"count": 4, "num_gpus": 0.25}, "feed": {"in_flight": 3}})
    assert cfg.generators.count == 4 and cfg.feed.in_flight == 3 and cfg.weights.on_stale == "use"
    for bad in ({"feed": {"in_flight": 0}}, {"generators": {"num_gpus": -1}}, {"weights": {"on_stale": "skip"}},
                {"feed": {"inflight": 2}}):
        with pytest.raises(ValidationError):
            RayConfig.model_validate(bad)


def test_staleness_and_policy():
    assert staleness(12, 10) == 2 and staleness(5, 5) == 0
    with pytest.raises(ValueError):
        staleness(3, 4)
    use, drop = StalenessPolicy(2, "use"), StalenessPolicy(2, "drop")
    for current, made_with in [(10, 9), (10, 7), (10, -1)]:  # fresh, stale, made without a student
        assert use.admit(current, made_with)
    assert [drop.admit(10, v) for v in (9, 7, -1)] == [True, False, True]
    assert use.metrics() == {"batches": 3, "stale": 1, "dropped": 0, "max_staleness": 3, "mean_staleness": 2.0}
    assert drop.metrics()["dropped"] == 1


@pytest.fixture(scope="module")
def actor(tmp_path_factory, digits_splits, teacher_dir):
    cfg = fast_digits_config(tmp_path_factory.mktemp("units"), teacher_dir, "synthesis.g_steps=2",
                             "synthesis.batch_size=20", "synthesis.g_life=5")
    ensure_teacher(cfg, digits_splits)
    return GeneratorActor(cfg.model_dump(mode="json"), 0, None, info_to_dict(digits_splits.info))


def test_record_round_trip_through_a_plain_dict(actor):
    payload = actor.generate(0, 3, 8, adversarial=True)  # no store: no student, so not adversarial
    assert payload["adversarial"] is False and payload["student_version"] == -1 and payload["step"] == 3
    record = record_from_dict(payload, copy=True)
    again = record_to_dict(record)
    assert set(again) <= set(payload)
    assert all(np.array_equal(again[k], payload[k]) for k in ("images", "labels", "teacher_logits"))
    assert record.images.flags.writeable and record.pixels == 20 * 8 * 8


def test_generator_is_rebuilt_when_a_g_life_boundary_is_crossed(actor):
    actor.epoch = None  # as a fresh actor: the first epoch seen never rebuilds
    assert [actor.maybe_rebuild(e) for e in (3, 4, 7, 6, 9, 10, 11)] == [False, False, True, False, False,
                                                                          True, False]


# Ray's processes that unpickle these modules: the Train controller (which imports torch anyway, with
# Ray Train's TorchConfig) and the weight store (which needs no torch at all); and the command line,
# which checks its arguments and starts the cluster before the heavy imports are done.
@pytest.mark.parametrize(("module", "unwanted"), [("orchestration.cli", ("torch", "timm", "muse.models", "ray.train")),
                                                  ("orchestration.commit_pointer", ("timm", "muse.models")),
                                                  ("sweeps.train_callbacks", ("timm", "muse.models")),
                                                  ("orchestration.weight_store", ("torch", "timm", "muse.models"))])
def test_what_ray_processes_unpickle_and_the_command_line_import_no_models(module, unwanted):
    """Each import costs seconds of every Train run's start-up on a small machine (a PBT trial starts a
    Train run per exploit)."""
    assert python_prints(f"import sys, {module}; print(sorted(m for m in {unwanted!r} if m in sys.modules))") == "[]"


def test_the_command_line_checks_its_config_without_loading_the_models():
    """Everything before the cluster starts (so the heavy imports can run beside ray.init)."""
    probe = ("import sys; from orchestration.cli import parse_args, resolve_config\n"
             "cfg, _ = resolve_config(parse_args(['--config', 'mnist', 'data.root=/tmp', '--generators', '2']))\n"
             "print(cfg.teacher.arch, sorted(m for m in ('torch', 'timm', 'ray.train') if m in sys.modules))")
    assert python_prints(probe) == "lenet5 []"


def test_importing_beside_a_block_loads_the_module_and_leaves_a_failed_import_to_the_caller():
    probe = ("import sys; from orchestration.cli import importing_beside\n"
             "with importing_beside('muse.models'): pass\n"
             "with importing_beside('muse.no_such_module'): pass\n"
             "print('muse.models' in sys.modules, 'muse.no_such_module' in sys.modules)")
    assert python_prints(probe) == "True False"


def python_prints(code: str) -> str:
    """What `code` prints in a fresh interpreter at the repository root (imports start from nothing)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()
