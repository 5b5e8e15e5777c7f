"""paged_tools.proc_cpu: the /proc readings behind the serving benchmark's split."""
import os
import sys
import threading
import time

import pytest

from paged_tools import proc_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")


def _native_id_of_a_thread_that_ended() -> int:
    native: list[int] = []
    t = threading.Thread(target=lambda: native.append(threading.get_native_id()))
    t.start()
    t.join()
    return native[0]


def test_thread_cpu_of_a_live_busy_thread_counts_its_time():
    before = proc_cpu.thread_cpu_s(os.getpid()).get(threading.get_native_id(), 0.0)
    deadline = time.thread_time() + 0.2
    while time.thread_time() < deadline:
        pass
    after = proc_cpu.thread_cpu_s(os.getpid())[threading.get_native_id()]
    assert after - before >= 0.1


def test_grouped_waits_put_every_live_thread_in_its_group():
    release, started = threading.Event(), threading.Event()
    helper_id: list[int] = []

    def wait_for_release():
        helper_id.append(threading.get_native_id())
        started.set()
        release.wait()

    helper = threading.Thread(target=wait_for_release)
    helper.start()
    started.wait()
    try:
        me = threading.get_native_id()
        groups = {me: "me", helper_id[0]: "helper"}
        waits = proc_cpu.grouped_thread_waits(os.getpid(), lambda tid: groups.get(tid, "others"))
    finally:
        release.set()
        helper.join()
    assert {"me", "helper"} <= set(waits)
    for group in ("me", "helper"):
        assert set(waits[group]) == {"wait_s", "preemptions"}
        assert waits[group]["wait_s"] >= 0.0 and waits[group]["preemptions"] >= 0


def test_grouped_waits_leave_out_threads_that_ended():
    ended = _native_id_of_a_thread_that_ended()
    waits = proc_cpu.grouped_thread_waits(os.getpid(), lambda tid: "ended" if tid == ended else "live")
    assert "ended" not in waits and "live" in waits


def test_readings_of_a_process_that_is_gone_are_empty():
    gone = 2 ** 22 + 12345  # above the default pid_max of 4,194,304: no such process
    assert proc_cpu.grouped_thread_waits(gone, lambda tid: "x") == {}
    assert proc_cpu.process_cpu_s(gone) is None
