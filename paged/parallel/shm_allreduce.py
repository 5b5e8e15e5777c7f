"""All-reduce through shared memory, for CPU ranks on one host.

gloo's all-reduce goes through loopback TCP: ~0.4 ms even for a few KiB on this kind of machine,
and a decode step makes 2 x layers + 1 of them, which costs more than the step's own compute.
Ranks on one host can instead meet in shared memory (vLLM's CPU backend does the same).

Layout of the arena: one 64-byte line per rank holding its sequence number (the collectives it
has published), then two slots of ``[world_size, SLOT_BYTES]``. Collective number ``k`` (chunked
by ``SLOT_BYTES``) uses slot ``k % 2``:

1. rank r copies its input into ``slot[r]`` and then publishes ``k`` in its line;
2. it waits until every line shows at least ``k``;
3. it sums ``slot[0] + slot[1] + ...`` in rank order into its tensor. Every rank adds the same
   values in the same order, so all ranks hold bit-identical results.

Why a slot may be overwritten: rank r writes slot ``k % 2`` again at ``k + 2`` only after step 2
of ``k + 1``, i.e. after every rank published ``k + 1``, which each does only after it finished
reading slot ``k % 2`` at ``k``. Ordering relies on x86's total store order (the data stores are
visible before the flag store that follows them; loads are not reordered with older loads), so
this path is used on x86-64 only; elsewhere gloo is used.

Waiting spins briefly, then yields the core, then sleeps in short naps: the peer is usually a few
microseconds behind, but on a loaded machine it may be descheduled.
"""
from __future__ import annotations

import os
import platform
import time

import torch

SLOT_BYTES = 4 << 20
_LINE_BYTES = 64
_SPINS, _YIELDS, _NAP_S = 200, 2000, 1e-4


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def arena_bytes(world_size: int) -> int:
    return world_size * _LINE_BYTES + 2 * world_size * SLOT_BYTES


class ShmAllReduce:
    """``all_reduce(x)`` (sum, in place) over the ranks that share ``arena`` (uint8, ``arena_bytes``)."""

    def __init__(self, arena: torch.Tensor, rank: int, world_size: int, timeout_s: float):
        lines = world_size * _LINE_BYTES
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.published = arena[:lines].view(torch.int64).view(world_size, _LINE_BYTES // 8)[:, 0].numpy()
        self.slots = arena[lines:lines + 2 * world_size * SLOT_BYTES].view(2, world_size, SLOT_BYTES)
        self.sequence = 0

    def _wait_for_all(self, sequence: int) -> None:
        published = self.published
        spins = 0
        deadline = None
        while published.min() < sequence:
            spins += 1
            if spins < _SPINS:
                continue
            if spins < _YIELDS:
                os.sched_yield()
                continue
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"shared-memory all-reduce: ranks {list((published < sequence).nonzero()[0])} "
                                   f"did not arrive within {self.timeout_s:.0f} s")
            time.sleep(_NAP_S)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            raise ValueError("shared-memory all-reduce needs a contiguous tensor")
        flat = x.view(-1)
        per_slot = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per_slot):
            part = flat[start:start + per_slot]
            count = part.numel()
            self.sequence += 1
            slot = self.slots[self.sequence % 2].view(x.dtype)
            slot[self.rank, :count].copy_(part)
            self.published[self.rank] = self.sequence
            self._wait_for_all(self.sequence)
            part.copy_(slot[0, :count])
            for other in range(1, self.world_size):
                part.add_(slot[other, :count])
        return x
