"""Iteration-level scheduler: which sequences run this step, and how many tokens each.

Token-centric: a sequence is scheduled for ``min(num_tokens - num_computed_tokens, budget)`` new
tokens, so a decode (1 token), a prefill, the next chunk of a long prompt and the recompute of a
preempted sequence are the same move. Priority is FCFS by request arrival: running sequences
first (oldest first), then swapped requests, then waiting ones; waiting requests are admitted in
order and none jumps the queue. When the pool runs dry the newest running request is preempted,
by recompute (free its blocks, requeue at the front) or swap (move them to the CPU pool), chosen
by ``preemption_mode`` ("auto" compares the estimated cost of each per victim).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from paged.block_manager import BlockManager
from paged.config import EngineConfig
from paged.sequence import ScheduledSeq, Sequence, SequenceGroup, SequenceStatus


@dataclass
class PreemptionCostModel:
    """Rough seconds to recompute tokens vs to move blocks out and back in."""
    flops_per_token: float
    block_bytes: int
    compute_flops_per_s: float = 2.5e11   # this project's CPU roofline (CPU_NOTES.md)
    copy_bytes_per_s: float = 2.0e10

    def prefers_swap(self, num_tokens_to_recompute: int, num_blocks_to_move: int) -> bool:
        recompute_s = num_tokens_to_recompute * self.flops_per_token / self.compute_flops_per_s
        swap_s = 2 * num_blocks_to_move * self.block_bytes / self.copy_bytes_per_s
        return swap_s < recompute_s


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, cost_model: PreemptionCostModel):
        self.config = config
        self.block_manager = block_manager
        self.cost_model = cost_model
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[SequenceGroup] = []
        self.num_recompute_preemptions = 0
        self.num_swap_preemptions = 0

    # ---- queues ---------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group.seqs[0])

    @property
    def num_waiting_requests(self) -> int:
        return len({seq.group.request_id for seq in self.waiting})

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove_group(self, group: SequenceGroup) -> None:
        """Drop every sequence of the group from the queues and free its blocks."""
        ids = {seq.seq_id for seq in group.seqs}
        self.waiting = deque(s for s in self.waiting if s.seq_id not in ids)
        self.running = [s for s in self.running if s.seq_id not in ids]
        self.swapped = [g for g in self.swapped if g is not group]
        for seq in group.seqs:
            self.block_manager.free(seq.seq_id)

    def add_forked(self, parent: Sequence, child: Sequence) -> None:
        """A child forked from a running parent runs right after it (same priority)."""
        self.block_manager.fork(parent.seq_id, child.seq_id)
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)

    # ---- preemption ---------------------------------------------------------------------------
    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        seqs = [s for s in self.running if s.group is group]
        bm = self.block_manager
        mode = self.config.preemption_mode
        use_swap = mode != "recompute" and bm.can_swap_out([s.seq_id for s in seqs])
        if use_swap and mode == "auto":
            blocks = len({b for s in seqs for b in bm.block_table(s.seq_id)})
            use_swap = self.cost_model.prefers_swap(sum(s.num_computed_tokens for s in seqs), blocks)
        self.running = [s for s in self.running if s.group is not group]
        if use_swap:
            out.swap_out.extend(bm.swap_out([s.seq_id for s in seqs]))
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            self.swapped.sort(key=lambda g: g.metrics.arrival_time)
            self.num_swap_preemptions += 1
        else:
            for seq in reversed(seqs):
                bm.free(seq.seq_id)
                seq.num_computed_tokens = 0
                seq.status = SequenceStatus.WAITING
                self.waiting.appendleft(seq)
            self.num_recompute_preemptions += 1

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        preempted = False
        scheduled_groups: set[int] = set()

        def schedule_seq(seq: Sequence, num_new: int) -> None:
            nonlocal budget
            out.copies.extend(bm.allocate_slots(seq.seq_id, seq.num_computed_tokens, num_new))
            out.scheduled.append(ScheduledSeq(seq, num_new))
            scheduled_groups.add(id(seq.group))
            budget -= num_new

        # 1. Running sequences, oldest request first; victims come from the tail.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq.seq_id, seq.num_computed_tokens, num_new):
                victim = self.running[-1].group
                if victim is seq.group:
                    if id(seq.group) not in scheduled_groups:
                        self._preempt(victim, out)
                        preempted = True
                    seq = None  # cannot run this step
                    break
                self._preempt(victim, out)
                preempted = True
            if seq is None:
                break
            schedule_seq(seq, num_new)
            index += 1

        # 2. Swapped requests come back before new ones, if nothing was preempted this step.
        while self.swapped and not preempted and budget > 0:
            group = self.swapped[0]
            seqs = group.seqs_with_status(SequenceStatus.SWAPPED)
            if len(self.running) + len(seqs) > self.config.max_num_seqs or budget < len(seqs):
                break
            # Room for the blocks, for every sequence's next tokens (a prompt swapped out
            # mid-prefill has many) and for one copy-on-write each.
            growth = sum(max(0, -(-(s.num_computed_tokens + min(s.num_tokens - s.num_computed_tokens, budget))
                                  // bm.block_size) - bm.num_swapped_blocks(s.seq_id)) + 1 for s in seqs)
            if bm.num_blocks_to_swap_in([s.seq_id for s in seqs]) + growth > bm.num_free_blocks:
                break
            self.swapped.pop(0)
            out.swap_in.extend(bm.swap_in([s.seq_id for s in seqs]))
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                schedule_seq(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))

        # 3. Waiting sequences in arrival order (preempted-by-recompute ones sit at the front).
        while self.waiting and not preempted and budget > 0 and not self.swapped:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            hits = bm.find_cached_prefix(seq.token_ids)
            computed = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - computed, budget)
            needed = -(-(computed + num_new) // bm.block_size) - len(hits)
            if needed > bm.num_free_blocks_after_hits(hits):
                break
            self.waiting.popleft()
            group = seq.group
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = time.time()
                group.num_cached_tokens = computed
                bm.prefix_cache.record_query(seq.num_tokens, computed)
            bm.take_cached_prefix(seq.seq_id, hits)
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            schedule_seq(seq, num_new)
        return out
