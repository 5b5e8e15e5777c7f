"""Step plans for tests, built the way the scheduler lays them out (block tables, slot mapping)."""
from __future__ import annotations

from paged.parallel.step import StepPlan


class PlanBuilder:
    """A few sequences with blocks handed out in order; emits prefill, chunk and decode plans.

    Blocks are taken from the end of the pool downwards so block ids differ from sequence indices
    (a plan that mixed them up would read the wrong KV)."""

    def __init__(self, block_size: int, num_blocks: int):
        self.block_size = block_size
        self.next_block = num_blocks - 1
        self.tables: list[list[int]] = []
        self.tokens: list[list[int]] = []
        self.computed: list[int] = []

    def add(self, prompt: list[int]) -> int:
        self.tables.append([])
        self.tokens.append(list(prompt))
        self.computed.append(0)
        return len(self.tokens) - 1

    def _slot(self, seq: int, position: int) -> int:
        table = self.tables[seq]
        while len(table) <= position // self.block_size:
            table.append(self.next_block)
            self.next_block -= 1
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def step(self, counts: dict[int, int]) -> StepPlan:
        """Schedule ``counts[seq]`` new tokens of each listed sequence; every listed sequence whose
        tokens are then all computed produces a logits row."""
        plan = StepPlan([], [], [], [], [0], [], [])
        for seq, count in counts.items():
            start = self.computed[seq]
            for position in range(start, start + count):
                plan.input_ids.append(self.tokens[seq][position])
                plan.positions.append(position)
                plan.slot_mapping.append(self._slot(seq, position))
            self.computed[seq] = start + count
            plan.seq_lens.append(start + count)
            plan.query_start_loc.append(plan.query_start_loc[-1] + count)
            plan.block_tables.append(list(self.tables[seq]))
            if self.computed[seq] == len(self.tokens[seq]):
                plan.logits_indices.append(plan.query_start_loc[-1] - 1)
        return plan

    def prefill_all(self) -> StepPlan:
        return self.step({seq: len(t) - self.computed[seq] for seq, t in enumerate(self.tokens)})

    def append(self, seq: int, token: int) -> None:
        self.tokens[seq].append(token)
