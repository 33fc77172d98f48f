"""The training loop every defence that trains shares (MIMIC's distillation and the baselines).

A defence describes one training phase by a `step_loss(x1, x2) -> (loss, terms)` on a batch of two
augmented views of the clean subset D, the optimiser, and the network that is saved. The loop around it
is the same for all: the views come through the stages' data path (`common.fastpath.pair_batches`: PIL
workers on the CPU, on-device tensor augmentation on CUDA, an order and augmentation that depend only on
(seed, epoch), so that `--resume` continues bit for bit), a non-finite loss stops the run, one JSON line
and one CSV row per epoch, and a resumable checkpoint every `--save_freq` epochs and after the last.

Under torchrun (common/distributed.py) each process trains on its share of the global batch, the trained network
through DistributedDataParallel (`contrastive_step` and `defences.mimic.distillation_step` build the wrapper), the
logged loss and terms are averaged over the processes (the global batch's), and rank 0 alone writes; what a
defence computes before it trains (a pruning mask, an inverted trigger) goes through `DefenceRun.once`, which
runs it in rank 0 alone and hands the result to every process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from common import distributed
from common.cli import check_finite, progress_disabled
from common.device import autocast
from common.fastpath import device_copy, pair_batches
from common.runs import (check_resumable, checkpoint_epochs, is_save_epoch, restore_optimizer, resume_state,
                         save_run_checkpoint, write_csv)
from datasets import ImagePairs, simclr_transform
from models import load_checkpoint
from models.checkpoint import load_state_into

StepLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Phase:
    """One training phase of a defence.

    `model` is what the checkpoints hold (a SimCLR); `set_modes` puts every network in its train/eval mode
    at the start of each epoch; `after_step` runs after each optimiser step (e.g. re-applies a pruning mask).
    `checkpoint_extra` is stored in every checkpoint of the phase (what a resumed run needs besides the
    weights: layer weights, masks, an inverted trigger).
    """
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_loss: StepLoss
    set_modes: Callable[[], None]
    checkpoint_pattern: str = 'model_{}.pth'
    log_name: str = 'log.csv'
    after_step: Callable[[], None] | None = None
    checkpoint_extra: dict = field(default_factory=dict)


def train_one_epoch(loader, optimizer: torch.optim.Optimizer, step_loss: StepLoss, *, set_modes: Callable[[], None],
                    epoch: int, epochs: int, device: torch.device, disable_progress: bool = False,
                    after_step: Callable[[], None] | None = None, desc: str = 'Train') -> dict[str, float]:
    """One pass over the loader's (x1, x2) batches; returns the epoch's mean loss and terms (under torchrun the
    global batch's: each step's are averaged over the processes before they are checked and summed)."""
    set_modes()
    totals, steps = {}, 0
    bar = tqdm(loader, disable=disable_progress)
    for step, (x1, x2) in enumerate(bar):
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        loss, terms = step_loss(x1, x2)
        reported = distributed.mean_over_ranks({'loss': loss, **terms})  # {'loss': loss, **terms} in one process
        check_finite(reported['loss'], epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        for key, value in reported.items():
            totals[key] = totals.get(key, 0.0) + value.item()
        bar.set_description(f'{desc} Epoch: [{epoch}/{epochs}] Loss: {totals["loss"] / steps:.4f}')
    return {key: value / steps for key, value in totals.items()}


def run_phase(phase: Phase, dataset: ImagePairs, args: argparse.Namespace, normalization, *, epochs: int,
              start_epoch: int, rows: list[dict], device: torch.device, results_dir: Path) -> list[dict]:
    """Epochs start_epoch+1 .. epochs of `phase` on the view pairs of `dataset`: train, log, checkpoint.

    `rows` holds the log rows of the epochs already run (a resumed run); returns all rows.
    """
    device_images = device_copy(dataset, args, device)  # the fast path keeps the clean subset on the device
    for epoch in range(start_epoch + 1, epochs + 1):
        loader = pair_batches(dataset, args, normalization, epoch, device, device_images)
        metrics = train_one_epoch(loader, phase.optimizer, phase.step_loss, set_modes=phase.set_modes, epoch=epoch,
                                  epochs=epochs, device=device, disable_progress=progress_disabled(args),
                                  after_step=phase.after_step, desc=phase.name)
        rows.append({'epoch': epoch, **metrics})
        write_csv(results_dir / phase.log_name, rows)
        line = rows[-1] if phase.log_name == 'log.csv' else {'phase': phase.name, **rows[-1]}
        print(json.dumps(line))
        if is_save_epoch(epoch, epochs, args.save_freq):
            save_run_checkpoint(results_dir / phase.checkpoint_pattern.format(epoch), phase.model, phase.optimizer,
                                epoch, args, log=rows, **phase.checkpoint_extra)
        distributed.barrier()  # the epoch is on disk before any process starts the next one
    return rows


@dataclass
class DefenceRun:
    """What a baseline's `purify(suspect, clean, run)` needs besides its inputs: the run's settings (`args`:
    epochs, batch size, lr, seed, per-defence flags, speed flags), the encoder's normalisation, the device and
    the results folder, and, with --resume, the checkpoints to continue from."""
    args: argparse.Namespace
    normalization: tuple
    device: torch.device
    results_dir: Path
    must_match: tuple[str, ...] = ()  # the flags a resumed run must share with the interrupted one

    @property
    def disable_progress(self) -> bool:
        return progress_disabled(self.args)

    def latest(self, pattern: str) -> Path | None:
        """With --resume, the latest checkpoint named like `pattern` in the results folder; else None."""
        if not getattr(self.args, 'resume', False):
            return None
        found = checkpoint_epochs(self.results_dir, pattern)
        return found[-1][1] if found else None

    def saved(self, pattern: str, key: str):
        """The value a resumed run recorded under `key` in its latest `pattern` checkpoint (a pruning mask, an
        inverted trigger: what the defence computed before training), or None for a fresh run."""
        latest = self.latest(pattern)
        return None if latest is None else load_checkpoint(latest).get(key)

    def once(self, key: str, compute: Callable[[], object], pattern: str = 'model_{}.pth'):
        """What the defence computes before it trains: the value a resumed run recorded under `key` (`saved`), else
        `compute()` — under torchrun run by rank 0 alone (which alone writes its files) and handed to every
        process, so that all train with the same one."""
        saved = self.saved(pattern, key)
        return saved if saved is not None else distributed.on_main(compute)

    def train(self, phase: Phase, images, epochs: int) -> list[dict]:
        """Run `phase` for `epochs` on view pairs of `images`, continuing its latest checkpoint with --resume."""
        start_epoch, rows = 0, []
        latest = self.latest(phase.checkpoint_pattern)
        if latest is not None:
            checkpoint = resume_state(latest)  # restores the RNG states it recorded
            check_resumable(checkpoint, self.args, latest, self.must_match)
            load_state_into(phase.model, checkpoint['state_dict'], latest)
            start_epoch = restore_optimizer(phase.optimizer, checkpoint, latest)
            rows = list(checkpoint.get('log') or [])
            print(f'resuming {phase.name} from {latest} (epoch {start_epoch})')
        pairs = ImagePairs(images, simclr_transform(self.normalization, images.shape[1]))
        return run_phase(phase, pairs, self.args, self.normalization, epochs=epochs, start_epoch=start_epoch,
                         rows=rows, device=self.device, results_dir=self.results_dir)


def contrastive_step(model: torch.nn.Module, temperature: float, device: torch.device, amp: bool = False,
                     extra: Callable | None = None) -> StepLoss:
    """SimCLR's step as a phase's step_loss: NT-Xent of the model's projections of the two views (docs/DESIGN.md §4.2).

    `extra(x1, x2, taps_1) -> dict of weighted terms` adds defence-specific terms computed from the same first
    forward pass (its tapped maps are returned only when `extra` is given). Under torchrun the model is called
    through its DistributedDataParallel wrapper (built here, once) and the NT-Xent takes its negatives from the
    global batch.
    """
    model = distributed.data_parallel(model, device)

    def step_loss(x1: torch.Tensor, x2: torch.Tensor):
        with autocast(device, amp):
            if extra is None:
                _, out_1 = model(x1)
                taps_1 = None
            else:
                _, out_1, taps_1 = model(x1, return_taps=True)
            _, out_2 = model(x2)
        terms = {'loss_con': distributed.nt_xent(out_1.float(), out_2.float(), temperature)}
        loss = terms['loss_con']
        if extra is not None:
            for name, (weight, value) in extra(x1, x2, taps_1).items():
                terms[name] = value
                loss = loss + weight * value
        return loss, terms
    return step_loss
