"""Timing tools shared by scripts/benchmark.py and scripts/investigate/original_harness.py.

This module imports nothing from the project: the harness that times the original implementation runs
with the original's `models` and `datasets` packages on its path, which share our packages' names.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class TimedLoader:
    """A loader whose steps after the first `warmup` are timed.

    The loop body of step k ends when batch k+1 is requested, so the time from requesting batch `warmup`
    to the loader's exhaustion covers steps warmup..n-1, their data loading included and the loader's
    start-up (worker processes) excluded. `batch_size` is the wrapped loader's (the original's training
    loops read it).
    """

    def __init__(self, loader, warmup: int, device: torch.device):
        self.loader, self.warmup, self.device = loader, warmup, device
        self.batch_size = getattr(loader, 'batch_size', None)
        self.seconds = math.nan

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()  # with no warm-up, the loader's start-up is timed too
        for index, batch in enumerate(self.loader):
            yield batch
            if index == self.warmup - 1:  # here the consumer has finished the last warm-up step
                synchronize(self.device)
                start = time.perf_counter()
        synchronize(self.device)
        self.seconds = time.perf_counter() - start

    @property
    def timed_steps(self) -> int:
        return len(self.loader) - self.warmup


@contextlib.contextmanager
def counting_forwards(module: torch.nn.Module):
    """Counts the forward passes of `module` and the images they carried while the block runs."""
    counter = {'calls': 0, 'images': 0}

    def count(_module, inputs, _output):
        counter['calls'] += 1
        counter['images'] += len(inputs[0])

    handle = module.register_forward_hook(count)
    try:
        yield counter
    finally:
        handle.remove()


def extrapolated_figures(args) -> list[str]:
    """The figures timed over fewer epochs than they stand for, and so scaled linearly."""
    measured = (('mi_estimation_s', args.mi_measure_epochs, args.mi_epochs),
                ('downstream_s', args.probe_measure_epochs, args.probe_epochs))
    return [key for key, epochs, full in measured if epochs < full]


def probe_figures(train_epochs: Callable[[int], None], args, device: torch.device) -> dict:
    """Time a probe: `train_epochs(k)` runs k epochs, each with its evaluation, and what it prints is dropped.
    One untimed warm-up epoch comes first when args.warmup is set. Then args.probe_measure_epochs epochs are
    timed and scaled linearly to args.probe_epochs."""
    def run(epochs: int) -> float:
        with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
            synchronize(device)
            start = time.perf_counter()
            train_epochs(epochs)
            synchronize(device)
        return time.perf_counter() - start

    if args.warmup:
        run(1)
    seconds = run(args.probe_measure_epochs)
    return {'downstream_s': seconds / args.probe_measure_epochs * args.probe_epochs,
            'probe_epoch_s': seconds / args.probe_measure_epochs}
