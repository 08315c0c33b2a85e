"""Shuffled training order, shared out among the processes of a torchrun run.

Every process holds the same seeded shuffler, so all draw the same permutation each epoch;
rank ``r`` of ``n`` takes every ``n``-th index of it, starting at ``r``. Consecutive ranks'
``k``-th batches of ``b`` images therefore hold exactly the images of the ``k``-th batch of
``n * b`` that one process would draw from the same permutation, and with one process the
order is the plain shuffled loader's, bit for bit (the permutation comes from torch's own
``RandomSampler`` with the loader's generator, so seeds give the orders they always gave).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``base``'s order among ``world`` processes.

    When the dataset does not divide evenly, the order is padded with its first indices (as
    torch's ``DistributedSampler`` does) so that every rank takes the same number of steps:
    data-parallel training waits on every rank at each step.
    """

    def __init__(self, base: Sampler[int], rank: int = 0, world: int = 1) -> None:
        self.base, self.rank, self.world = base, rank, world

    def __len__(self) -> int:
        assert isinstance(self.base, Sized)
        return -(-len(self.base) // self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        padding = len(self) * self.world - len(order)
        order += order[:padding]
        return iter(order[self.rank :: self.world])
