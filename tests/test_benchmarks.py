"""The benchmarks' arithmetic, on fake reports (the measurements themselves are scripts, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.cpu_profile import DRIVER, RAY_SYSTEM, cpu_by_role, role_of, snapshot
from benchmarks.pbt_segments import read_segments, report
from benchmarks.pipeline import PIPELINE_KEYS, derive, format_table, record_pipeline
from benchmarks.stages import row
from benchmarks.startup import format_table as startup_table
from benchmarks.startup import marks_since, medians


def fake_pipeline_report() -> dict:
    """The shape of issue 12's measurement: 2 cores, generate 34.2 s and distill 4.1 s at one thread."""
    report = {"device": "cpu (2 cores)", "cores": 2,
              "work": {"episodes": 16, "kd_steps": 120, "synthesis_batch": 100, "resolutions": [8, 16]},
              "generate_only_s": 34.2, "distill_only_s": 4.1, "sequential_s": 38.7, "sequential_acc": 82.2,
              "sequential_all_cores_s": 30.0, "sequential_all_cores_acc": 81.0, "cluster_start_s": 4.0}
    return report | {key: {} for key in PIPELINE_KEYS}


def fake_summary(loop_s: float, synthesis_s: float, wall_s: float, startup_s: float) -> dict:
    return {"loop_s": loop_s, "wall_s": wall_s, "synthesis_episodes": 18,
            "timing": {"startup_s": startup_s, "actors_ready_s": 3.0, "workers_started_s": 12.0,
                       "first_batch_s": startup_s + 2.0, "synthesis_before_loop_s": 0.0, "loop_started_s": startup_s},
            "synthesis": {"synthesis_s": synthesis_s}, "student_acc": 80.0,
            "staleness": [{"mean_staleness": 4.0, "max_staleness": 12}, {"mean_staleness": 2.0, "max_staleness": 20}]}


def test_machine_efficiency_is_the_machines_best_over_the_pipeline():
    report = fake_pipeline_report()
    record_pipeline(report, "1", 1, fake_summary(34.4, 33.0, 60.0, 20.0), 1.0)
    record_pipeline(report, "2", 2, fake_summary(25.3, 44.2, 50.0, 21.0), 2.0)
    derived = derive(report)
    assert derived["machine_best_s"] == pytest.approx((34.2 + 4.1) / 2)  # the cores, not the trainer, bind
    assert derived["machine_efficiency"]["2"] == pytest.approx(19.15 / 25.3)
    assert derived["machine_efficiency"]["1"] == pytest.approx(19.15 / 34.4)
    assert derived["overlap_efficiency"]["2"] == pytest.approx(34.2 / 25.3)  # the old, speed-up figure
    assert derived["best_generators"] == "2"
    assert derived["best_vs_sequential_all_cores"] == pytest.approx(30.0 / 25.3)
    assert derived["run_s"]["2"] == pytest.approx(21.0 + 25.3)  # start-up counts here
    assert derived["run_efficiency"]["2"] == pytest.approx(19.15 / 46.3)


def test_a_trainer_bound_machine_is_bounded_by_distillation():
    report = fake_pipeline_report() | {"generate_only_s": 2.0, "distill_only_s": 10.0}
    record_pipeline(report, "1", 1, fake_summary(12.5, 2.0, 20.0, 5.0), 0.0)
    assert derive(report)["machine_efficiency"]["1"] == pytest.approx(10.0 / 12.5)


def test_pipeline_record_splits_startup_loop_and_teardown_and_reads_staleness():
    report = fake_pipeline_report()
    record_pipeline(report, "2", 2, fake_summary(25.0, 45.0, 50.0, 21.0), 2.0)
    assert report["feed_overhead"]["2"] == pytest.approx(1 - 45.0 / 50.0)
    assert report["startup_s"]["2"] == 21.0 and report["teardown_s"]["2"] == pytest.approx(4.0)
    assert report["staleness"]["2"] == {"mean": 3.0, "max": 20}
    assert report["batches_per_s"]["2"] == pytest.approx(18 / 25.0)
    report |= derive(report)
    table = format_table(report)
    assert "pipeline 2 gen" in table and "0.77" in table and "3.0 / 20" in table
    assert "2 gen: 21.0 / 3.0 / 12.0 / 23.0 s" in table and "run() → last epoch 46.0 s" in table


def test_startup_marks_count_from_the_command_and_the_median_is_per_mark():
    source = {"first_episode_at": 1000.0 + 12.5, "worker_started_at": 1000.0 + 23.0, "first_record_at": 1000.0 + 25.5,
              "issued": 9}
    assert marks_since(1000.0, source) == {"first_episode_s": 12.5, "worker_in_loop_s": 23.0, "first_batch_s": 25.5}
    repeats = [{"first_episode_s": 12.5, "command_s": 40.0}, {"first_episode_s": 11.0, "command_s": 44.0},
               {"first_episode_s": 14.0, "command_s": 39.0}]
    assert medians(repeats) == {"first_episode_s": 12.5, "command_s": 40.0}
    table = startup_table({"repeats": repeats, "median": medians(repeats)})
    assert table.splitlines()[-1].split() == ["median", "12.5s", "40.0s"]


def test_stage_overhead_is_plain_throughput_over_ours():
    r = row("distillation", images=1000, ours_s=4.0, plain_s=2.0, pixels_per_image=256)
    assert r["ours_images_s"] == 250.0 and r["plain_images_s"] == 500.0
    assert r["overhead"] == 2.0 and r["ours_pixels_s"] == 250.0 * 256


def test_pbt_segment_overhead_is_wall_minus_epochs_over_epochs(tmp_path):
    # Trial a: its first segment (a start: 30 s of wall for 20 s of epochs), then two that continued
    # its Train run (21 s for 20 s), then one after a clone (resumed_from: 28 s for 20 s).
    # Trial b: one start; its results before the clock existed are skipped.
    lines = {"trial_a": [{"segment_wall_s": 30.0, "segment_loop_s": 20.0, "epochs_done": 8, "resumed_from": ""},
                         {"segment_wall_s": 21.0, "segment_loop_s": 20.0, "epochs_done": 11, "resumed_from": ""},
                         {"segment_wall_s": 21.0, "segment_loop_s": 20.0, "epochs_done": 14, "resumed_from": ""},
                         {"segment_wall_s": 28.0, "segment_loop_s": 20.0, "epochs_done": 17, "resumed_from": "/x/ckpt"}],
             "trial_b": [{"epochs_done": 5}, {"segment_wall_s": 50.0, "segment_loop_s": 25.0, "epochs_done": 8}]}
    for trial, results in lines.items():
        (tmp_path / "tune" / trial).mkdir(parents=True)
        (tmp_path / "tune" / trial / "result.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    summary = report(read_segments(tmp_path))
    assert [s["kind"] for s in summary["segments"]] == ["first", "continued", "continued", "restarted", "first"]
    assert summary["continued"]["segments"] == 2 and summary["continued"]["median_overhead"] == pytest.approx(0.05)
    assert summary["first"]["median_overhead"] == pytest.approx(0.75)  # of 0.5 and 1.0
    assert summary["restarted"]["median_overhead"] == pytest.approx(0.4)
    assert summary["all"]["total_overhead"] == pytest.approx((150 - 105) / 105)
    assert summary["all"]["overhead_s"] == pytest.approx(45.0)
    assert summary["after_first"]["total_overhead"] == pytest.approx((70 - 60) / 60)


def test_pbt_segments_of_a_folder_without_a_clock_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no PBT results with a segment clock"):
        read_segments(tmp_path)


def test_cpu_by_role_counts_each_process_over_the_window_and_the_idle_rest():
    samples = [(0.0, {1: (5.0, "driver", -9.0), 2: (10.0, "generator actors", -5.0)}),
               (1.0, {1: (5.5, "driver", -9.0), 2: (11.0, "generator actors", -5.0), 3: (0.5, "train worker", 0.8),
                      4: (30.0, "ray system", -3.0)}),  # 4 was missed at the window's start
               (2.0, {1: (5.6, "driver", -9.0), 2: (12.0, "generator actors", -5.0), 4: (30.1, "ray system", -3.0)}),
               (3.0, {1: (9.0, "driver", -9.0), 2: (20.0, "generator actors", -5.0)})]  # after the window
    used = cpu_by_role(samples, start=0.5, end=2.5, cores=2)
    # 3 started in the window and exited (its last sample stands); 4 counts from its first sample
    assert used == {"driver": pytest.approx(0.6), "generator actors": pytest.approx(2.0), "idle": pytest.approx(0.8),
                    "ray system": pytest.approx(0.1), "train worker": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="no sample"):
        cpu_by_role(samples, start=-1.0, end=2.5, cores=2)


def test_a_snapshot_finds_the_processes_below_this_one_with_their_cpu_time():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.4\nwhile time.time() < end: pass\n"
                             "time.sleep(30)"])
    try:
        time.sleep(1.5)
        processes = snapshot(os.getpid())
        assert processes[os.getpid()][1] == DRIVER
        cpu_s, role, started = processes[busy.pid]
        assert role == RAY_SYSTEM and 0.3 <= cpu_s <= 1.5 and abs(started - (time.time() - 1.5)) < 1.0
        assert role_of("ray::GeneratorActor.generate()", 7, 1) == "generator actors"
    finally:
        busy.kill()
        busy.wait()
