"""The per-image (PIL) data path's loaders: DataLoaders whose order depends only on (seed, epoch), so that a
resumed run sees exactly the batches of an uninterrupted one, and their torchrun form (this rank's rows of the
same global batches). `datasets.fastpath` chooses between them and the tensor path's device batches.
"""
from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run cleanly (run_main);
    otherwise SIGINT kills them first and the main process dies of 'worker exited unexpectedly'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class InterruptSafeLoader(DataLoader):
    """A DataLoader whose workers are started with SIGINT blocked, so a Ctrl-C that arrives while they
    fork is delivered to the main process once they run (and ignore it), never to a half-started worker."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order and augmentation draws: seed · 100003 + epoch (a prime stride, so that
    no two (seed, epoch) pairs of a run's range share one)."""
    return seed * 100003 + epoch


def epoch_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, drop_last: bool,
                 num_workers: int, seed: int, epoch: int, device: torch.device) -> DataLoader:
    """A DataLoader whose order (and worker seeds) depend only on (seed, epoch), so resumed runs
    see exactly the batches an uninterrupted run would."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return InterruptSafeLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                               num_workers=num_workers, generator=generator,
                               worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
                               pin_memory=device.type == 'cuda', persistent_workers=False)


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which `epoch_loader(shuffle=True)` visits a dataset of `size` items in epoch `epoch`.

    The loader's iterator draws its workers' base seed from the (seed, epoch) generator first, then its
    RandomSampler draws the permutation from the same generator (tests/stages/test_distributed.py checks this against
    the loader itself).
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
    return torch.randperm(size, generator=generator)


class RankBatches(Sampler):
    """A batch sampler over this process's share of each global batch: rows rank·b .. (rank+1)·b − 1
    (b = batch_size / world_size) of the global batches `epoch_loader` would form (drop_last), in order."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        order = epoch_permutation(self.size, self.seed, self.epoch)
        local = self.batch_size // self.world_size
        for step in range(len(self)):
            start = step * self.batch_size + self.rank * local
            yield order[start:start + local].tolist()


def rank_epoch_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int, epoch: int,
                      device: torch.device, rank: int, world_size: int) -> DataLoader:
    """`epoch_loader(shuffle=True, drop_last=True)` for one process of a torchrun job: this rank's rows of the
    same global batches. The workers' augmentation draws come from seeds of (seed, epoch, rank): each process
    draws its own, so the views are not those of one process (only the images are)."""
    state = np.random.SeedSequence((seed % 2 ** 32, epoch, rank)).generate_state(1)[0]
    return InterruptSafeLoader(dataset, batch_sampler=RankBatches(len(dataset), batch_size, seed, epoch, rank,
                                                                  world_size),
                               num_workers=num_workers, generator=torch.Generator().manual_seed(int(state)),
                               worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
                               pin_memory=device.type == 'cuda', persistent_workers=False)
