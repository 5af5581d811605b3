"""What the benchmarks read off the processes they measure, from /proc: a process family (a
gateway and whatever it spawned), its resident memory and CPU time, and pinning it to a core."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def family(pids: list[int]) -> set[int]:
    """``pids`` and all their descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, grew = set(pids), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def rss_kb(pids: list[int]) -> int:
    """Resident memory of ``pids`` and their descendants, in KB."""
    total = 0
    for pid in family(pids):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time used so far by ``pids`` and their descendants."""
    total = 0
    for pid in family(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / TICKS


def pin(pids: list[int], cpus: set[int]) -> None:
    """Run every thread of ``pids`` and their descendants on ``cpus`` only (threads they start
    later inherit it)."""
    for pid in family(pids):
        try:
            threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                continue


def unpin(pids: list[int]) -> None:
    pin(pids, set(range(os.cpu_count() or 1)))


def core_busy() -> list[tuple[int, int]]:
    """Per CPU, (busy, total) jiffies so far, from /proc/stat; differences of two readings give
    how busy each core was in between."""
    cores = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]  # idle, iowait
            cores.append((sum(values) - idle, sum(values)))
    return cores


def busy_share(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """The share of time each core was busy between two :func:`core_busy` readings."""
    return [(b1 - b0) / max(1, t1 - t0) for (b0, t0), (b1, t1) in zip(before, after, strict=True)]
