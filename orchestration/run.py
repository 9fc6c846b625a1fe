"""`python orchestration/run.py [flags] [overrides]`: MUSE on Ray (see `orchestration/cli.py`,
`orchestration/runner.py` and `--help`). Also the entry point of `ray job submit -- python
orchestration/run.py`.

Importing this module changes nothing; `main` bootstraps the process and hands over to the command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    # Keep every Ray listener of a cluster we start on 127.0.0.1: Ray reads this when it is imported,
    # so before the runner (and with it Ray) is.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # run as a script: make the repo root importable
        sys.path.insert(0, repo)
    from orchestration.cli import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
