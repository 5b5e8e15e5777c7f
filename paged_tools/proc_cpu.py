"""CPU time of processes and of their threads, read from /proc (Linux), for the serving benchmark.

``utime + stime`` of /proc/<pid>/stat (a process, all its threads, without its children) and of
/proc/<pid>/task/<tid>/stat (one thread), in seconds. A reading of a process that is gone, or of a
system without /proc, is None: callers report "not measured" rather than a wrong figure.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_s(path: Path) -> float | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its last ")"
    fields = text[text.rindex(")") + 2:].split()
    # fields now start at field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _TICKS


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by every thread of ``pid``."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _thread_ids(pid: int) -> list[int]:
    """Native ids of ``pid``'s live threads ([] for a process that is gone)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each live thread of ``pid``, by native thread id."""
    out: dict[int, float] = {}
    for tid in _thread_ids(pid):
        cpu = _stat_cpu_s(Path(f"/proc/{pid}/task/{tid}/stat"))
        if cpu is not None:
            out[tid] = cpu
    return out


def thread_name(pid: int, tid: int) -> str:
    """The kernel's name of one thread (``comm``, at most 15 characters; the JVM sets it), or ""."""
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def grouped_thread_cpu_s(pid: int, group_of: Callable[[int], str]) -> dict[str, float]:
    """CPU seconds of ``pid``'s live threads summed per group (``group_of(native thread id)``).

    Threads that ended before the reading are in no group: compare the sum with
    ``process_cpu_s`` to see what they took.
    """
    sums: dict[str, float] = {}
    for tid, cpu in thread_cpu_s(pid).items():
        group = group_of(tid)
        sums[group] = sums.get(group, 0.0) + cpu
    return sums


def _thread_wait_s_and_preemptions(pid: int, tid: int) -> tuple[float, int] | None:
    """(seconds runnable but waiting for a core, times preempted) of one thread so far, or None.

    The wait is field 2 of /proc/<pid>/task/<tid>/schedstat (nanoseconds on a run queue); the
    preemptions are ``nonvoluntary_ctxt_switches`` of its status file.
    """
    base = Path(f"/proc/{pid}/task/{tid}")
    try:
        wait_ns = int((base / "schedstat").read_text().split()[1])
        status = (base / "status").read_text()
    except (OSError, IndexError, ValueError):
        return None
    for line in status.splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return wait_ns / 1e9, int(line.split()[1])
    return None


def grouped_thread_waits(pid: int, group_of: Callable[[int], str]) -> dict[str, dict[str, float]]:
    """Per group of ``pid``'s live threads: ``wait_s``, the seconds they sat runnable on a run queue
    while another task held the core, and ``preemptions``, how often the scheduler took a core
    from one of them. On two cores shared by an OpenMP engine and other processes these say how
    much of the engine's time went to waiting for a core (a kernel without scheduler statistics
    reports a zero wait)."""
    sums: dict[str, dict[str, float]] = {}
    for tid in _thread_ids(pid):
        reading = _thread_wait_s_and_preemptions(pid, tid)
        if reading is None:
            continue
        group = sums.setdefault(group_of(tid), {"wait_s": 0.0, "preemptions": 0})
        group["wait_s"] += reading[0]
        group["preemptions"] += reading[1]
    return sums
