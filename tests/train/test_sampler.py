"""The trainer's epoch sampler: a permutation per (seed, epoch), optionally length-grouped."""

import pytest
import torch

from melora.experiments.train.batching import EpochShuffle


def lengths_of(size: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 200, (size,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("size,batch", [(1000, 32), (1003, 32), (5, 8), (64, 64)])
def test_grouped_order_is_a_permutation(size, batch):
    sampler = EpochShuffle(size, seed=3, lengths=lengths_of(size), batch_size=batch)
    order = list(sampler)
    assert sorted(order) == list(range(size))
    assert len(sampler) == size


def test_grouped_batches_pad_less_than_random_ones():
    size, batch = 3200, 32
    lengths = lengths_of(size)
    padded = {}
    for name, sampler in {
        "random": EpochShuffle(size, seed=0),
        "grouped": EpochShuffle(size, seed=0, lengths=lengths, batch_size=batch),
    }.items():
        order = list(sampler)
        padded[name] = sum(max(lengths[i] for i in order[k : k + batch]) * batch for k in range(0, size, batch))
    # Random batches of 32 pad nearly everything to ~200; sorted windows of 50 batches
    # pad each batch only to its neighbours' lengths.
    assert padded["grouped"] < 0.6 * padded["random"]


def test_grouped_order_depends_only_on_seed_and_epoch():
    lengths = lengths_of(500)
    a = EpochShuffle(500, seed=1, lengths=lengths, batch_size=16)
    b = EpochShuffle(500, seed=1, lengths=lengths, batch_size=16)
    a.use_epoch(2)
    b.use_epoch(2)
    assert list(a) == list(b)
    b.use_epoch(3)
    assert list(a) != list(b)  # a new epoch reshuffles
    c = EpochShuffle(500, seed=2, lengths=lengths, batch_size=16)
    c.use_epoch(2)
    assert list(a) != list(c)


def test_only_the_last_batch_may_be_short():
    size, batch = 1003, 32
    lengths = lengths_of(size)
    order = list(EpochShuffle(size, seed=0, lengths=lengths, batch_size=batch))
    # Every full batch is sorted (longest first) inside; the 11 leftover examples come last.
    for k in range(0, size - size % batch, batch):
        chunk = [lengths[i] for i in order[k : k + batch]]
        assert chunk == sorted(chunk, reverse=True)
    assert len(order[size - size % batch :]) == size % batch


def test_length_grouping_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one length per example"):
        EpochShuffle(10, seed=0, lengths=[1, 2, 3], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        EpochShuffle(3, seed=0, lengths=[1, 2, 3])
