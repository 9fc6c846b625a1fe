"""What a PBT segment costs besides its epochs, read from a finished (or stopped) sweep's folder.

    python sweeps/run.py sweeps/resolution_pbt.yaml --num-cpus 2
    python benchmarks/pbt_segments.py runs/sweeps/resolution_pbt --json pbt.json

Every Tune result of a PBT trial carries `segment_wall_s` (seconds in the trial process since the trial
started or last reported) and `segment_loop_s` (seconds its Train run spent in the epoch loop over
the same stretch; see `sweeps.trial.SegmentClock`). A segment's overhead is their difference: Train
runs and generator actors started, checkpoints handed to Tune, outputs written. Segments are reported
in three kinds: a trial's `first` (it pays the trial's start-up, as any run does), those that
`continued` a running Train run, and those that `restarted` one from a checkpoint (`resumed_from` set:
PBT cloned another trial, or paused this one). The figure asked for is the overhead over the epoch
time, as a median over segments and as a total; `after_first` totals every segment but the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from muse.io import save_json

TUNE_DIR = "tune"
KINDS = ("first", "continued", "restarted")


def read_segments(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per Tune result that has the segment clock: trial, epochs_done, wall, loop and kind."""
    segments = []
    for result_file in sorted((Path(sweep_dir) / TUNE_DIR).glob("*/result.json")):
        first = True
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            if "segment_wall_s" not in result:
                continue
            kind = "first" if first else "restarted" if result.get("resumed_from") else "continued"
            segments.append({"trial": result_file.parent.name, "epochs_done": result["epochs_done"],
                             "wall_s": result["segment_wall_s"], "loop_s": result["segment_loop_s"], "kind": kind})
            first = False
    if not segments:
        raise SystemExit(f"error: no PBT results with a segment clock under {Path(sweep_dir) / TUNE_DIR}: give "
                         "the folder of a PBT sweep run by this version (runs/sweeps/<name>)")
    return segments


def overhead(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Overhead of a set of segments: (wall - loop) / loop, per segment (median) and in total."""
    if not segments:
        return {"segments": 0}
    ratios = [(s["wall_s"] - s["loop_s"]) / s["loop_s"] for s in segments if s["loop_s"] > 0]
    wall, loop = sum(s["wall_s"] for s in segments), sum(s["loop_s"] for s in segments)
    return {"segments": len(segments), "median_wall_s": statistics.median(s["wall_s"] for s in segments),
            "median_loop_s": statistics.median(s["loop_s"] for s in segments),
            "median_overhead": statistics.median(ratios) if ratios else None,
            "total_overhead": (wall - loop) / loop if loop > 0 else None,
            "overhead_s": wall - loop}


def report(segments: list[dict[str, Any]]) -> dict[str, Any]:
    return {"all": overhead(segments), "after_first": overhead([s for s in segments if s["kind"] != "first"]),
            **{kind: overhead([s for s in segments if s["kind"] == kind]) for kind in KINDS},
            "segments": segments}


def format_table(summary: dict[str, Any]) -> str:
    lines = ["segments    | count | median wall s | median epochs s | median overhead | total overhead",
             "------------+-------+---------------+-----------------+-----------------+---------------"]
    for name in ("all", "after_first", *KINDS):
        row = summary[name]
        if not row["segments"]:
            lines.append(f"{name:<11} | {0:>5} | {'-':>13} | {'-':>15} | {'-':>15} | {'-':>14}")
            continue
        lines.append(f"{name:<11} | {row['segments']:>5} | {row['median_wall_s']:>13.1f} | {row['median_loop_s']:>15.1f} | "
                     f"{row['median_overhead']:>15.0%} | {row['total_overhead']:>14.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's folder (runs/sweeps/<name>)")
    parser.add_argument("--json", type=Path, help="also write the figures and every segment here")
    args = parser.parse_args(argv)
    summary = report(read_segments(args.sweep_dir))
    print(format_table(summary))
    if args.json:
        save_json(summary | {"sweep_dir": str(args.sweep_dir)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
