"""``SchedulerOutput``: the plan of one step, from ``Scheduler.schedule()`` to ``Executor.execute``."""
from __future__ import annotations

from dataclasses import dataclass, field

from paged.sequence import ScheduledSeq, Sequence, SequenceGroup


@dataclass
class SchedulerOutput:
    """The plan of one step: everything the model runner needs, in order.

    ``scheduled[i]`` runs its next ``num_new_tokens`` tokens with block table ``block_tables[i]``
    (final for this step). Before the forward, the runner applies ``swap_out`` (device -> CPU
    block), then ``prefix_offload`` (device -> CPU: cached blocks evicted into the CPU tier), then
    ``swap_in`` (CPU -> device block), then ``prefix_load`` (CPU -> device: CPU-tier hits), then
    ``copies`` (copy-on-write, device -> device). Device blocks freed or evicted while planning
    may be handed out again in the same plan, which is why everything that reads the device runs
    before anything that writes it (the block manager keeps CPU blocks a plan reads until it ran).
    """
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    prefix_offload: list[tuple[int, int]] = field(default_factory=list)
    prefix_load: list[tuple[int, int]] = field(default_factory=list)
    swapped_out: list[SequenceGroup] = field(default_factory=list)  # preempted by swap in this plan

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """Sequences whose last token runs this step (they get logits), in plan order."""
        return [item.seq for item in self.scheduled if item.samples]
