import os
import subprocess
import sys
from pathlib import Path

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
