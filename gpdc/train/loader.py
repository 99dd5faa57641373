"""Batches for ``gpdc train`` from any map-style dataset: DataLoader workers (persistent, pinned memory on CUDA),
each rank its share of the epoch's permutation, and augmentation that depends only on (seed, epoch, sample) —
the same with any number of workers and after ``--resume``. An image that cannot be read is named by its path
(``data.bad_images: stop``) or left out and counted (``skip``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from ..errors import GpdcError
from ..spec import DataSpec


def default_workers(world: int) -> int:
    """The cores of this rank less one (the training process), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // max(world, 1) - 1))


class EpochOrder(Sampler):
    """(epoch, index) keys of this rank's share of the epoch's order: a permutation seeded by (seed, epoch) when
    shuffling, else the dataset's order; call ``set_epoch`` before each epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int, shuffle: bool):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)[self.rank::self.world]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)[self.rank::self.world]

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self.order()])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass(frozen=True)
class BadSample:
    path: str
    reason: str


class Keyed(Dataset):
    """``base[i]`` for the key (epoch, i), its random transforms seeded by (seed, epoch, i); an unreadable sample
    becomes a ``BadSample`` naming its file."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        """torch's CPU generator, ``random`` and numpy's global generator are seeded for the sample's transforms.
        torch's state is restored after (in the training process it drives the training and is checkpointed);
        ``random`` and numpy are left seeded (restoring them costs more than decoding a small image). The default
        generator is seeded directly: ``torch.manual_seed`` seeds every device too, 60 µs a sample."""
        epoch, i = key
        seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.base[i]
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated
            return BadSample(_path_of(self.base, i), f"{type(e).__name__}: {e}".strip())
        finally:
            generator.set_state(state)


def _path_of(ds: Dataset, i: int) -> str:
    samples = getattr(ds, "samples", None) or getattr(ds, "imgs", None)
    return str(samples[i][0]) if samples is not None else f"sample {i}"


def collate(batch: list):
    """(the batch of readable samples or None, the BadSamples)."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    return (default_collate(good) if good else None), [b for b in batch if isinstance(b, BadSample)]


class Batches:
    """Iterates one rank's batches of an epoch, moved to ``device``; counts the bad samples it left out."""

    def __init__(self, ds: Dataset, batch: int, device: torch.device, spec: DataSpec, seed: int, rank: int,
                 world: int, shuffle: bool):
        self.ds, self.batch, self.device, self.policy = ds, batch, device, spec.bad_images
        self.order = EpochOrder(len(ds), seed, rank, world, shuffle)
        self.skipped: list[BadSample] = []
        self.loader = None
        if not isinstance(ds, TensorDataset):  # tensors in memory need no workers
            workers = default_workers(world) if spec.workers is None else spec.workers
            pin = device.type == "cuda" if spec.pin_memory is None else spec.pin_memory
            self.loader = DataLoader(Keyed(ds, seed), batch_size=batch, sampler=self.order, num_workers=workers,
                                     collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers > 0 else None)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch)

    def epoch(self, epoch: int):
        self.order.set_epoch(epoch)
        self.skipped = []
        if self.loader is None:
            x, y = self.ds.tensors
            idx = self.order.order()
            for i in range(0, len(idx), self.batch):
                j = idx[i:i + self.batch]
                yield x[j].to(self.device), y[j].to(self.device)
            return
        for xy, bad in self.loader:
            if bad and self.policy == "stop":
                raise GpdcError(f"cannot read the image {bad[0].path} ({bad[0].reason}). Remove or replace it, or set "
                                "data.bad_images: skip in the spec to leave such images out (they are counted).")
            self.skipped += bad
            if xy is not None:
                x, y = xy
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
