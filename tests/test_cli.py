import os
import subprocess
import sys
from pathlib import Path

import pytest

from muse.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_show_config_prints_the_resolved_tree(capsys):
    assert main(["show-config", "--config", "digits", "method=nayer"]) == 0
    out = capsys.readouterr().out
    assert "method: nayer" in out and "kr: 0.0" in out


def test_bad_config_exits_2_with_the_field_named(capsys):
    assert main(["distill", "--config", "digits", "loss.nope=1"]) == 2
    assert "loss.nope: unknown field" in capsys.readouterr().err


def test_importing_the_ray_script_changes_nothing():
    """`orchestration/run.py` bootstraps in `main` only: importing it sets no variable and puts no folder of
    ours on sys.path (Ray, imported with the package, adds its own vendored folders)."""
    code = ("import os, sys; sys.path.insert(0, '.'); env, path = dict(os.environ), list(sys.path); "
            "import orchestration.run; assert dict(os.environ) == env, 'environment changed'; "
            "added = [p for p in sys.path if p not in path and 'site-packages' not in p]; "
            "assert not added, f'sys.path gained {added}'")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_overrides_may_follow_a_flag():
    """`seed=1 --no-tracking loss.kr=0`: argparse alone would take `loss.kr=0` for an unknown argument."""
    from orchestration.cli import parse_args

    args = parse_args(["seed=1", "--no-tracking", "loss.kr=0", "--workers", "1", "seed=2"])
    assert args.overrides == ["seed=1", "loss.kr=0", "seed=2"] and args.no_tracking and args.workers == 1


def test_an_unknown_flag_between_overrides_is_named(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distill", "seed=1", "--bogus", "loss.kr=0"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("unrecognized arguments: --bogus"), last


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["distill", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "--resume continues a run and --overwrite deletes it" in capsys.readouterr().err
