"""``python -m paged.parallel.launch <torchrun arguments>``: torchrun that dies with the engine.

The engine starts its worker group through this module instead of ``torch.distributed.run``
directly: it arms the parent-death signal in the torchrun agent itself (the agent is a process
between the engine and the ranks, and ranks only watch their own parent), then hands every
argument to torchrun unchanged. ``PAGED_TP_PARENT_PID`` names the engine's pid; without it (a
node started by hand) no death signal is armed: such ranks still exit when their connection to
the engine closes.
"""
from __future__ import annotations

import os
import sys

from paged.parallel.lifecycle import die_with_parent

PARENT_PID_ENV = "PAGED_TP_PARENT_PID"


def main(argv: list[str] | None = None) -> None:
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        die_with_parent(expected_parent=int(parent))
    from torch.distributed.run import main as torchrun_main  # after arming: torch imports take seconds

    torchrun_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
