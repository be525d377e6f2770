"""Seeds, the row order of each epoch and the micro-batches of a run.

Data order is a pure function of (seed, epoch), and the data position is one counter of
micro-batches consumed, so a resumed run draws exactly the batches the uninterrupted run drew.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from cai.errors import CaiError
from cai.train.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class BatchStream:
    """Micro-batches of row indices over epochs, addressed by a global micro-batch counter.

    With several processes, each global batch of batch_size * world rows is split by rank (a short
    last batch is topped up with rows from the start of the epoch so every process gets a share).
    With `lengths`, batches are grouped by length: the epoch's permutation is cut into windows of
    `group` global batches, each window is sorted by length and cut into batches, and the batch
    order is shuffled. Rows of similar length then share a batch, so padding to the longest row of
    the batch wastes little compute. Either way the order depends only on (seed, epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None, group: int = 64):
        if n < world:
            raise CaiError(f"{n} training rows for {world} processes: need at least one row per process")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} rows")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.lengths, self.group = lengths, group
        self.per_epoch = math.ceil(n / (batch_size * world))
        self._batches: dict[int, list[list[int]]] = {}

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global micro-batch counter."""
        return divmod(micro_step, self.per_epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (all processes' rows) of one epoch, in order."""
        if epoch not in self._batches:
            order = epoch_order(self.n, self.seed, epoch)
            span = self.batch_size * self.world
            if self.lengths is None:
                batches = [order[i:i + span] for i in range(0, self.n, span)]
            else:
                window = span * self.group
                batches = []
                for w in range(0, self.n, window):
                    chunk = sorted(order[w:w + window], key=lambda i: -self.lengths[i])
                    batches += [chunk[i:i + span] for i in range(0, len(chunk), span)]
                shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1)))
                batches = [batches[i] for i in shuffle.tolist()]
            for b in batches:
                if len(b) % self.world:
                    b += order[: self.world - len(b) % self.world]
            self._batches = {epoch: batches}
        return self._batches[epoch]

    def batch(self, micro_step: int) -> list[int]:
        epoch, index = self.position(micro_step)
        rows = self.epoch_batches(epoch)[index]
        share = len(rows) // self.world
        return rows[self.rank * share:(self.rank + 1) * share]


def total_steps(config: TrainConfig, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, else ceil(epochs * micro-batches per epoch / grad_accum)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
