"""Making the processes of a worker group die with their parent.

TorchServe kills a worker with SIGKILL on unregister, which leaves no time for cleanup, so each
process of the chain engine -> torchrun agent -> rank asks the kernel to kill it when its parent
dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``). The kernel sends the signal when the *thread* that
forked the child exits, so the engine must start its group from a thread that lives as long as the
engine (the engine's own thread does).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    ``expected_parent``: exit at once if the parent is already another process (it died before
    the signal was armed and we were re-parented), so no orphan survives that race.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or (expected_parent is not None and parent != expected_parent):
        os._exit(1)
