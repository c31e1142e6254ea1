"""The data stream both pipelines read (torchvision and DALI): stream positions 0, 1, 2, ... over
consecutive epochs, each epoch a fresh permutation of the images seeded by (seed, epoch); ranks take
interleaved micro-batches of positions; seeds are mixed from integers the same way in every process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from fastbyol.errors import FastByolError

_MASK64 = (1 << 64) - 1
MAX_CONSECUTIVE_BAD = 32


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 finaliser), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


T = TypeVar("T")


class StreamOrder:
    """Stream position -> image index: epoch ``position // n`` is a fresh permutation of the n images,
    seeded by (seed, epoch). Shared by the torchvision and DALI pipelines, so both read the same image
    at every position."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return int(self._perm[offset])

    def read(self, position: int, read: Callable[[int], T]) -> tuple[T, int, list[str]]:
        """``read(index)`` of the image at ``position``; an unreadable one (``FastByolError``) is
        replaced by the next image of the stream, and reported. Returns (value, index, skip messages)."""
        skipped: list[str] = []
        for attempt in range(MAX_CONSECUTIVE_BAD):
            index = self.index_at(position + attempt)
            try:
                return read(index), index, skipped
            except FastByolError as e:
                skipped.append(str(e))
        raise FastByolError(
            f"{MAX_CONSECUTIVE_BAD} unreadable images in a row near stream position {position} "
            f"(last: {skipped[-1]}): run `fastbyol data check --full` on the data folder and train on the clean list "
            "it writes (data.file_list)")


def shard_positions(start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
                    ) -> Iterator[list[int]]:
    """This rank's micro-batches of stream positions.

    The stream is cut into global micro-batches of ``micro_batch * world`` consecutive positions, from
    ``start`` (a global position: what the checkpoint stores); rank r takes the r-th ``micro_batch`` of
    each. So across ranks every position is read exactly once (every image once per epoch), a sample's
    augmentation seed is its position (different on every rank, the same after a resume), and there is
    never a partial batch: the stream runs on across epoch boundaries."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    for b in range(num_batches):
        first = start + (b * world + rank) * micro_batch
        yield list(range(first, first + micro_batch))
