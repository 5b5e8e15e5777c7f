"""Iteration-level scheduler: which sequences run this step, how many tokens each, and what the
step's outcome does to them.

Token-centric: a sequence is scheduled for ``min(num_tokens - num_computed_tokens, budget)`` new
tokens, so a decode (1 token), a prefill, the next chunk of a long prompt and the recompute of a
preempted sequence are the same move. Priority is FCFS by request arrival: running sequences
first (oldest first), then swapped requests, then waiting ones; waiting requests are admitted in
order and none jumps the queue. When the pool runs dry the newest running request is preempted,
by recompute (free its blocks, requeue at the front) or swap (move them to the CPU pool), chosen
by ``preemption_mode`` ("auto" compares the estimated cost of each per victim).

Invariants between steps:
- every RUNNING sequence is in ``running`` and holds device blocks for its computed tokens;
  every SWAPPED one belongs to a group in ``swapped``; WAITING ones hold no blocks;
- ``running`` never holds more than ``max_num_seqs`` sequences: a request is admitted only when
  every sequence it will fork into (``params.num_seqs``) fits;
- ``num_computed_tokens`` only grows in ``update_from_output``, after the model ran.

The scheduler owns the KV manager (paged/kv_manager.py: the block manager for ``kv_memory:
paged``, the virtual KV manager for ``virtual``; one protocol, so nothing here branches on the
memory model): it is the only caller of its allocation, and the engine reads it through
``make_stats`` and acts on it through the few methods below (admission check, pins,
``reset_kv_cache``), never through its own structures.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from paged.config import EngineConfig
from paged.decoding import StepDecisions
from paged.outputs import FinishReason
from paged.sampling_params import SamplingParams
from paged.scheduler_output import SchedulerOutput
from paged.sequence import ScheduledSeq, Sequence, SequenceGroup, SequenceStatus
from paged.stats import SchedulerStats

if TYPE_CHECKING:
    from paged.kv_manager import KVManager
    from paged.kv_sizing import PreemptionCostModel


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: "KVManager", cost_model: "PreemptionCostModel",
                 eos_token_ids: list[int], max_model_len: int):
        self.config = config
        self.kv_manager = kv_manager
        self.cost_model = cost_model
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.num_prompt_tokens_computed = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[SequenceGroup] = []
        self.num_recompute_preemptions = 0
        self.num_swap_preemptions = 0
        self._utilization_sum = 0.0
        self._utilization_steps = 0
        self._held_blocks_sum = 0       # blocks the sequences hold, summed over steps
        self._unshared_blocks_sum = 0   # ... and what they would hold without sharing

    # ---- the KV memory, as the engine sees it --------------------------------------------------
    @property
    def block_manager(self) -> "KVManager":
        """The KV manager under its paged name (callers from before kv_memory existed)."""
        return self.kv_manager

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise InvalidRequestError when the KV memory could never hold the request."""
        self.kv_manager.check_request_fits(num_prompt_tokens, params)

    def check_pin_fits(self, token_ids: list[int]) -> None:
        """Raise InvalidRequestError unless ``token_ids`` can be pinned with room left for one
        request of ``max_model_len`` tokens."""
        self.kv_manager.check_pin_fits(token_ids, self.max_model_len)

    def pin_prefix(self, key: Hashable, token_ids: list[int]) -> int:
        """Pin the cached full blocks of ``token_ids`` (see ``BlockManager.pin_prefix``)."""
        return self.kv_manager.pin_prefix(key, token_ids)

    def unpin_prefix(self, key: Hashable) -> int:
        return self.kv_manager.unpin_prefix(key)

    def reset_kv_cache(self) -> None:
        """The KV cache was lost (a failed executor): the pool becomes whole and empty. Only once
        no sequence holds blocks (the caller failed the running and swapped ones)."""
        assert not self.running and not self.swapped, "reset while sequences hold KV"
        self.kv_manager.reset()

    def abandon_plan(self, plan: SchedulerOutput) -> None:
        """Running ``plan`` failed, so its block moves may not have happened: forget what they
        were to fill. The caller then ends the plan's requests."""
        self.kv_manager.drop_prefix_moves(plan.prefix_offload, plan.prefix_load)

    def record_kv_usage(self) -> None:
        """After a step: add live tokens / the capacity the sequences hold (block slots or page
        bytes), and the units held vs unshared, to the sums ``make_stats`` reports."""
        sample = self.kv_manager.usage_sample(self.running)
        if sample is None:
            return
        utilization, held, unshared = sample
        self._utilization_sum += utilization
        self._utilization_steps += 1
        self._held_blocks_sum += held
        self._unshared_blocks_sum += unshared

    def make_stats(self) -> SchedulerStats:
        """The queues, preemptions, KV use and the pool's counters now."""
        return SchedulerStats(
            kv=self.kv_manager.make_stats(), num_running=len(self.running), num_waiting=len(self.waiting),
            num_swapped=sum(len(g.seqs_with_status(SequenceStatus.SWAPPED)) for g in self.swapped),
            live_tokens=sum(seq.num_computed_tokens for seq in self.running),
            num_recompute_preemptions=self.num_recompute_preemptions, num_swap_preemptions=self.num_swap_preemptions,
            prompt_tokens_total=self.num_prompt_tokens_computed, kv_utilization_sum=self._utilization_sum,
            kv_utilization_steps=self._utilization_steps, sharing_held_blocks_sum=self._held_blocks_sum,
            sharing_unshared_blocks_sum=self._unshared_blocks_sum)

    # ---- queues ---------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group.seqs[0])

    @property
    def num_waiting_requests(self) -> int:
        return len({seq.group.request_id for seq in self.waiting})

    def remove_group(self, group: SequenceGroup) -> None:
        """Drop every sequence of the group from the queues and free its blocks."""
        ids = {seq.seq_id for seq in group.seqs}
        if any(seq.status == SequenceStatus.WAITING for seq in group.seqs):
            self.waiting = deque(s for s in self.waiting if s.seq_id not in ids)
        self.running = [s for s in self.running if s.seq_id not in ids]
        self.swapped = [g for g in self.swapped if g is not group]
        for seq in group.seqs:
            self.kv_manager.free(seq.seq_id)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A child forked from a running parent shares its blocks and runs right after it."""
        self.kv_manager.fork(parent.seq_id, child.seq_id)
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """The running sequence is done: it leaves ``running`` and gives its blocks back."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.running.remove(seq)
        self.kv_manager.free(seq.seq_id)

    # ---- preemption ---------------------------------------------------------------------------
    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        seqs = [s for s in self.running if s.group is group]
        bm = self.kv_manager
        mode = self.config.preemption_mode
        ids = [s.seq_id for s in seqs]
        use_swap = mode != "recompute" and bm.can_swap_out(ids)
        if use_swap and mode == "auto":
            use_swap = self.cost_model.prefers_swap(sum(s.num_computed_tokens for s in seqs), bm.swap_out_bytes(ids))
        self.running = [s for s in self.running if s.group is not group]
        if use_swap:
            out.swap_out.extend(bm.swap_out(ids))
            out.swapped_out.append(group)
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

    # ---- the plan -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.kv_manager
        bm.end_plan()  # normally done in update_from_output; here too after a failed step
        budget = self.config.max_num_batched_tokens
        preempted = False
        scheduled_groups: set[int] = set()

        def add_to_plan(seq: Sequence, num_new: int) -> None:
            nonlocal budget
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
            out.block_tables.append(bm.block_table(seq.seq_id))
            scheduled_groups.add(id(seq.group))
            budget -= num_new

        # 1. Running sequences, oldest request first; victims come from the tail.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while (copies := bm.allocate_slots(seq.seq_id, seq.num_computed_tokens, num_new)) is None:
                victim = self.running[-1].group
                if victim is seq.group and id(seq.group) in scheduled_groups:
                    break  # a sibling already runs this step: this one waits for the next
                self._preempt(victim, out)
                preempted = True
                if victim is seq.group:
                    break
            if copies is None:
                break
            out.copies.extend(copies)
            add_to_plan(seq, num_new)
            index += 1

        # 2. Swapped requests come back before new ones, if nothing was preempted this step.
        while self.swapped and not preempted and budget > 0:
            group = self.swapped[0]
            seqs = group.seqs_with_status(SequenceStatus.SWAPPED)
            if len(self.running) + len(seqs) > self.config.max_num_seqs or budget < len(seqs):
                break
            # a prompt swapped out mid-prefill has many tokens left; each gets at most the budget
            num_new = [min(s.num_tokens - s.num_computed_tokens, budget) for s in seqs]
            ids = [s.seq_id for s in seqs]
            if sum(num_new) > budget or not bm.can_swap_in(
                    ids, [s.num_computed_tokens + n for s, n in zip(seqs, num_new)]):
                break
            self.swapped.pop(0)
            out.swap_in.extend(bm.swap_in(ids))
            for seq, count in zip(seqs, num_new):
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.copies.extend(bm.allocate_slots(seq.seq_id, seq.num_computed_tokens, count))
                add_to_plan(seq, count)

        # 3. Waiting sequences in arrival order (preempted-by-recompute ones sit at the front).
        # Every sequence a request will fork into counts against max_num_seqs from its admission.
        num_seqs = len(self.running) + sum(s.group.params.num_seqs - 1 for s in self.running if not s.group.forked)
        while self.waiting and not preempted and budget > 0 and not self.swapped:
            seq = self.waiting[0]
            group = seq.group
            will_run = 1 if group.forked else group.params.num_seqs
            if num_seqs + will_run > self.config.max_num_seqs:
                break
            hits = bm.find_cached_prefix(seq.token_ids)
            computed = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - computed, budget)
            if bm.allocate_slots(seq.seq_id, computed, num_new, new_computed_blocks=hits) is None:
                break
            self.waiting.popleft()
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = time.time()
                group.num_cached_tokens = computed
                bm.record_prefix_query(seq.num_tokens, computed)
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += will_run
            add_to_plan(seq, num_new)
        out.prefix_offload, out.prefix_load = bm.take_prefix_moves()
        return out

    # ---- the outcome --------------------------------------------------------------------------
    def update_from_output(self, plan: SchedulerOutput, decisions: StepDecisions) -> list[Sequence]:
        """The model ran the plan and the decoder decided: advance ``num_computed_tokens``,
        register full blocks in the prefix cache, fork, append the new tokens and finish what
        ends by token (end token, max_tokens, max_model_len). Returns the sequences that got a
        token, in decision order. Failed requests (``decisions.failed``) are left to the caller."""
        bm = self.kv_manager
        bm.end_plan()
        for item in plan.scheduled:
            seq = item.seq
            before = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            if before < seq.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(seq.num_prompt_tokens, seq.num_computed_tokens) - before
            if seq.num_computed_tokens // bm.block_size > before // bm.block_size:
                bm.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        for parent, child in decisions.forks:
            self.fork(parent, child)
        grown = []
        for new in decisions.new_tokens:
            seq = new.seq
            seq.token_ids.append(new.token)
            if new.cumulative_logprob is not None:
                seq.cumulative_logprob = new.cumulative_logprob
            elif new.logprob is not None:
                seq.cumulative_logprob += new.logprob
            if new.top_logprobs is not None:
                seq.logprobs.append(new.top_logprobs)
            self._check_stop_token(seq, new.token)
            grown.append(seq)
        for beam in decisions.dropped:
            self.drop(beam)
        return grown

    def _check_stop_token(self, seq: Sequence, token: int) -> None:
        params = seq.group.params
        if seq.num_output_tokens >= params.min_tokens and (
                token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)):
            self.finish(seq, FinishReason.STOP)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, FinishReason.LENGTH)

    def drop(self, seq: Sequence) -> None:
        """A beam that ends without a result: out of the queues and out of its request."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv_manager.free(seq.seq_id)
        seq.group.seqs.remove(seq)
