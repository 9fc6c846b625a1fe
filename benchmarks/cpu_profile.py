"""Where a machine's cores go during a run: CPU seconds per process role, read from /proc (Linux).

`CpuSampler` polls the CPU time (user + system) of this process and of every process below it (a
local Ray cluster's raylet, GCS, dashboard, and every worker they start) and the role each plays,
named from its command line (Ray titles a worker process `ray::<ActorClass>...`). `cpu_by_role` turns
the samples into the CPU seconds each role used over a window, plus what stayed idle of the cores.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Command-line prefix → role; anything else below this process is Ray's own machinery.
ROLES = (("ray::GeneratorActor", "generator actors"), ("ray::RayTrainWorker", "train worker"),
         ("ray::TrainController", "train controller"), ("ray::WeightStore", "weight store"))
RAY_SYSTEM = "ray system (raylet, GCS, dashboard, idle workers)"
DRIVER = "driver"

# (time.time(), pid → (CPU seconds so far, role, time.time() the process started))
Sample = tuple[float, dict[int, tuple[float, str, float]]]


def boot_time() -> float:
    """time.time() at boot, to 10 ms (/proc/stat's `btime` is rounded to the second)."""
    return time.time() - float(Path("/proc/uptime").read_text().split()[0])


BOOT_TIME = boot_time()


def read_process(pid: int) -> tuple[int, float, str, float] | None:
    """(parent pid, CPU seconds so far, command line, start time) of a live process; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) on
    return (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS_PER_S, cmdline.strip(),
            BOOT_TIME + int(fields[19]) / TICKS_PER_S)


def role_of(cmdline: str, pid: int, root: int) -> str:
    if pid == root:
        return DRIVER
    return next((role for prefix, role in ROLES if cmdline.startswith(prefix)), RAY_SYSTEM)


def snapshot(root: int) -> dict[int, tuple[float, str, float]]:
    """CPU seconds, role and start time of `root` and of every process below it."""
    processes = {int(p): info for p in os.listdir("/proc") if p.isdigit() and (info := read_process(int(p)))}
    children: dict[int, list[int]] = {}
    for pid, (parent, *_) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in processes:
            _, cpu_s, cmdline, started = processes[pid]
            found[pid] = (cpu_s, role_of(cmdline, pid, root), started)
            todo.extend(children.get(pid, []))
    return found


def cpu_by_role(samples: list[Sample], start: float, end: float, cores: int) -> dict[str, float]:
    """CPU seconds each role used between `start` and `end` (time.time()): for each process, its last
    sample at or before `end` less its last at or before `start` (0 for a process started in the
    window; its first sample for one that existed but was missed then: a slight undercount), and
    `idle`: the cores' capacity over the window that no process below the root used."""
    if not samples or samples[0][0] > start:
        raise ValueError("no sample at or before the window's start")
    base: dict[int, float] = {}
    last: dict[int, tuple[float, str, float]] = {}
    for at, processes in samples:
        if at > end:
            break
        for pid, (cpu_s, _, started) in processes.items():
            if at <= start or pid not in base:
                base[pid] = cpu_s if at <= start or started < start else 0.0
        last.update(processes)
    used: dict[str, float] = {}
    for pid, (cpu_s, role, _) in last.items():
        used[role] = used.get(role, 0.0) + max(0.0, cpu_s - base[pid])
    used["idle"] = max(0.0, cores * (end - start) - sum(used.values()))
    return dict(sorted(used.items()))


class CpuSampler:
    """Samples `snapshot(os.getpid())` every `interval_s` in a thread while in its `with` block."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.samples: list[Sample] = []
        self._root = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while True:
            self.samples.append((time.time(), snapshot(self._root)))
            if self._stop.wait(interval_s):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), snapshot(self._root)))
