"""How a run's examples become micro-batches: the trainer's batching strategies.

A strategy is a batch sampler (lists of example indices, one list per
micro-batch of one process) with ``use_epoch(epoch)``; its order depends only
on ``(seed, epoch)``, so a resumed run sees the batches an uninterrupted one does.

- ``EpochBatches(EpochShuffle(...))``: a new permutation every epoch, cut into
  micro-batches, optionally length-grouped (GLUE; the trainer's default).
- ``FixedBatches(length_grouped_batches(...))``: micro-batches fixed once per
  run (the official Alpaca recipe's ``--group_by_length``), visited in a new
  order every epoch (instruction tuning).

Both group by length the same way, ``sort_windows``: cut an order into windows,
sort each by decreasing length, cut into micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def sort_windows(order: torch.Tensor, lengths: torch.Tensor, window: int, batch_size: int) -> list[torch.Tensor]:
    """Micro-batches of similar length: ``order`` cut into windows, each sorted longest first, cut into batches.

    Args:
        order: ``(N,)`` example indices.
        lengths: ``(num_examples,)`` token counts, indexed by example.
        window: Examples sorted together.
        batch_size: Examples per micro-batch; a window's last batch may be short.
    """
    batches = []
    for chunk in order.split(window):
        # Stable: examples of equal length keep their order, so the batches depend only on the order.
        by_length = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches += list(by_length.split(batch_size))
    return batches


class EpochShuffle(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``: resumable and reproducible.

    With ``lengths`` and ``batch_size`` the permutation is length-grouped: it is
    cut into windows of ``GROUP_WINDOW`` micro-batches, each window is sorted by
    length and cut into micro-batches, and the micro-batches are shuffled. Each
    consecutive run of ``batch_size`` indices then holds examples of similar length.
    """

    GROUP_WINDOW = 50

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int | None = None) -> None:
        if lengths is not None and (len(lengths) != size or not batch_size):
            raise ValueError(f"length grouping needs one length per example ({size}) and a batch_size, got {len(lengths)} and {batch_size}")
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths = torch.as_tensor(lengths) if lengths is not None else None
        self.batch_size = batch_size

    # Not called set_epoch: accelerate's prepared loader calls set_epoch() with its
    # own iteration counter, which restarts at 0 in a resumed run.
    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = _generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.lengths is None:
            return iter(order.tolist())
        batches = sort_windows(order, self.lengths, self.batch_size * self.GROUP_WINDOW, self.batch_size)
        # The short last batch (if any) stays last so every other batch is full.
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) != self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter(torch.cat(shuffled + rest).tolist() if batches else [])

    def __len__(self) -> int:
        return self.size


class EpochBatches(BatchSampler):
    """``EpochShuffle``'s order cut into micro-batches of ``batch_size`` (the last may be short)."""

    def __init__(self, sampler: EpochShuffle, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def use_epoch(self, epoch: int) -> None:
        self.sampler.use_epoch(epoch)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, window: int, seed: int | None = 0,
                           group_by_length: bool = True) -> list[list[int]]:
    """Fixed micro-batches, of similar length with ``group_by_length``.

    The examples are shuffled (``seed``; ``None``: kept in order and sorted as
    one window, for evaluation sets), cut into windows of ``window`` examples,
    each sorted by decreasing length and cut into micro-batches of ``batch_size``.
    Without ``group_by_length`` the shuffled order is cut as it is.
    """
    if batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {batch_size}")
    lengths = torch.as_tensor(list(lengths))
    if seed is None:
        order, window = torch.arange(len(lengths)), max(len(lengths), 1)
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    batches = sort_windows(order, lengths, window, batch_size) if group_by_length else order.split(batch_size)
    return [b.tolist() for b in batches]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded ``(batch, longest)`` token grids that is padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if len(b))
    return 1.0 - real / max(padded, 1)


class FixedBatches(Sampler[list[int]]):
    """Fixed micro-batches, visited in an order that depends only on ``(seed, epoch)``."""

    def __init__(self, batches: Sequence[Sequence[int]], seed: int) -> None:
        self.batches, self.seed, self.epoch = [list(b) for b in batches], seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.batches), generator=_generator(self.seed, self.epoch))
        return iter([self.batches[i] for i in order.tolist()])

    def __len__(self) -> int:
        return len(self.batches)
