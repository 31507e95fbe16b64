"""Which rows, crops and instructions each iteration of a run uses: pure functions of (seed, iteration).

Nothing depends on process-local state, so a resumed run sees exactly the batches an
uninterrupted one would, and ``N`` processes with ``batch_size`` rows each see the same global
batch as one process with ``N * batch_size`` rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

_SEED_STRIDE = 1_000_003  # keeps per-sample crop seeds of different runs' seeds apart


class RunBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(row index, crop seed)`` for iterations ``start``..``stop`` of one process.

    The rows form an endless stream of seeded permutations (one per pass over the data, as a
    shuffling loader that restarts each pass); iteration ``i`` takes stream positions
    ``[i * global_batch, (i + 1) * global_batch)`` and this process its ``rank``-th slice.
    """

    def __init__(self, rows: int, batch_size: int, world_size: int, rank: int, seed: int, start: int, stop: int):
        self.rows, self.batch_size, self.world_size, self.rank = rows, batch_size, world_size, rank
        self.seed, self.start, self.stop = seed, start, stop
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        for iteration in range(self.start, self.stop):
            first = iteration * global_batch + self.rank * self.batch_size
            yield [(self._row(p), self.seed * _SEED_STRIDE + p) for p in range(first, first + self.batch_size)]

    def _row(self, position: int) -> int:
        epoch_pass, offset = divmod(position, self.rows)
        if epoch_pass not in self._orders:
            self._orders = {epoch_pass: permutation(self.rows, self.seed + epoch_pass)}  # one pass at a time
        return self._orders[epoch_pass][offset]


def permutation(rows: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(rows, generator=generator).tolist()


def choose_instructions(questions: Sequence[str | None], instructions: Sequence[str], seed: int,
                        iteration: int) -> list[str]:
    """A row's own question, else one instruction per batch drawn as XrayGPT does (seeded by iteration)."""
    drawn = random.Random(f"{seed}:{iteration}").choice(list(instructions))
    return [question or drawn for question in questions]


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch seed for dropout in one iteration of one process."""
    return (seed * _SEED_STRIDE + iteration) * 64 + rank
