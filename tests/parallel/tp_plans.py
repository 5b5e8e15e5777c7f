"""Step inputs for tests, built the way the scheduler lays them out (block tables, slot mapping)."""
from __future__ import annotations

import numpy as np

from paged.model_runner import ModelInput


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
        self.last_sampled: list[int] = []  # the sequences behind the last plan's logits rows, in order

    def add(self, prompt: list[int]) -> int:
        self.tables.append([])
        self.tokens.append(list(prompt))
        self.computed.append(0)
        return len(self.tokens) - 1

    def take_block(self) -> int:
        self.next_block -= 1
        return self.next_block + 1

    def _slot(self, seq: int, position: int) -> int:
        table = self.tables[seq]
        while len(table) <= position // self.block_size:
            table.append(self.take_block())
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def step(self, counts: dict[int, int]) -> ModelInput:
        """Schedule ``counts[seq]`` new tokens of each listed sequence; every listed sequence whose
        tokens are then all computed produces a logits row."""
        plan = ModelInput([], [], [], [], [0], np.zeros((0, 0), dtype=np.int32), [])
        tables = []
        self.last_sampled = []
        for seq, count in counts.items():
            start = self.computed[seq]
            for position in range(start, start + count):
                plan.input_ids.append(self.tokens[seq][position])
                plan.positions.append(position)
                plan.slot_mapping.append(self._slot(seq, position))
            self.computed[seq] = start + count
            plan.seq_lens.append(start + count)
            plan.query_start_loc.append(plan.query_start_loc[-1] + count)
            tables.append(list(self.tables[seq]))
            if self.computed[seq] == len(self.tokens[seq]):
                plan.logits_indices.append(plan.query_start_loc[-1] - 1)
                self.last_sampled.append(seq)
        plan.block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
        for row, table in enumerate(tables):
            plan.block_tables[row, :len(table)] = table
        return plan

    def prefill_all(self) -> ModelInput:
        return self.step({seq: len(t) - self.computed[seq] for seq, t in enumerate(self.tokens)})

    def append_sampled(self, tokens: list[int]) -> None:
        """Append the tokens sampled from the last plan's logits rows to their sequences."""
        for seq, token in zip(self.last_sampled, tokens):
            self.tokens[seq].append(token)

    def fork(self, seq: int) -> tuple[int, tuple[int, int]]:
        """A child sharing ``seq``'s full blocks; its partly filled last block is copied (copy on
        write). Returns the child and the (src, dst) block copy to put in the next plan."""
        child = self.add(self.tokens[seq])
        self.computed[child] = self.computed[seq]
        last = self.tables[seq][-1]
        self.tables[child] = self.tables[seq][:-1] + [self.take_block()]
        return child, (last, self.tables[child][-1])

    def move(self, seq: int, new_blocks: list[int]) -> list[tuple[int, int]]:
        """Give ``seq`` new blocks (as after a swap-out and swap-in); the (old, new) pairs."""
        pairs = list(zip(self.tables[seq], new_blocks))
        self.tables[seq] = list(new_blocks)
        return pairs
