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


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each live thread of ``pid``, by native thread id."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        cpu = _stat_cpu_s(Path(f"/proc/{pid}/task/{tid}/stat"))
        if cpu is not None:
            out[int(tid)] = cpu
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
