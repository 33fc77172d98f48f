"""What every defence that trains shares: a phase of training, and the run that holds the defence's settings.

A defence describes one training phase by a `step_loss(x1, x2) -> (loss, terms)` on a batch of two augmented views
of the clean subset D, the optimiser, and the network that is saved. The project's one training engine
(`common.engine`) runs it: the views come through the stages' data path (`datasets.fastpath.pair_batches`: PIL
workers on the CPU, on-device tensor augmentation on CUDA, an order and augmentation that depend only on (seed,
epoch), so that `--resume` continues bit for bit), a non-finite loss stops the run, one JSON line and one CSV row
per epoch, and a resumable checkpoint every `--save_freq` epochs and after the last.

Under torchrun (common/distributed.py) each process trains on its share of the global batch, the trained network
through DistributedDataParallel (built by the engine, `Training.parallel`, and handed to the phase's step), the
logged loss and terms are averaged over the processes (the global batch's), and rank 0 alone writes; what a
defence computes before it trains (MIMIC's layer weights, a pruning mask, an inverted trigger) goes through
`DefenceRun.once`, which runs it in rank 0 alone and hands the result to every process.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common import distributed
from common.cli import progress_disabled
from common.engine import StepLoss, Training, train_steps
from common.runs import checkpoint_epochs, save_layout_checkpoint, save_run_checkpoint
from core import processes
from datasets import ImagePairs, simclr_transform
from datasets.fastpath import device_copy, pair_batches
from models import CheckpointError, Layout, load_checkpoint, save_in_layout
from models.visual_checkpoint import RESUME_WEIGHTS


@dataclass
class Phase:
    """One training phase of a defence.

    `model` is what the checkpoints hold (a SimCLR). `step(trained) -> step_loss(x1, x2)` builds the phase's
    step around `trained`, which is `forward` (the module the step calls to run `model`: `model` itself, or its
    torch.compile wrapper) as the engine hands it over: itself in one process, its DistributedDataParallel
    wrapper under torchrun (`common.engine.Training.parallel` with `parallel_options`). `set_modes` puts every
    network in its train/eval mode at the start of each epoch; `after_step` runs after each optimiser step
    (e.g. re-applies a pruning mask); `lr_at(epoch, step)` is a per-step learning-rate schedule
    (`common.engine.train_steps`). `checkpoint_extra` is stored in every checkpoint of the phase (what a resumed
    run needs besides the weights: layer weights, masks, an inverted trigger).
    """
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.nn.Module], StepLoss]
    set_modes: Callable[[], None]
    forward: torch.nn.Module | None = None  # None: `model` itself
    parallel_options: dict = field(default_factory=dict)  # e.g. find_unused_parameters: a head no loss uses
    checkpoint_pattern: str = 'model_{}.pth'
    log_name: str = 'log.csv'
    after_step: Callable[[], None] | None = None
    lr_at: Callable[[int, int], float] | None = None
    checkpoint_extra: dict = field(default_factory=dict)


@dataclass
class DefenceRun:
    """What a defence's `purify(suspect, clean, run)` needs besides its inputs: the run's settings (`args`:
    epochs, batch size, lr, seed, per-defence flags, speed flags), the encoder's normalisation, the device and
    the results folder, and, with --resume, the checkpoints to continue from."""
    args: argparse.Namespace
    normalization: tuple
    device: torch.device
    results_dir: Path
    must_match: dict[str, object] = field(default_factory=dict)  # {flag: default}: core.cli.resume_flags
    layout: Layout | None = None  # a real-world suspect's file layout: every checkpoint is written in it (§3.1)

    @property
    def disable_progress(self) -> bool:
        return progress_disabled(self.args)

    def latest(self, pattern: str) -> Path | None:
        """With --resume, the latest checkpoint named like `pattern` in the results folder; else None."""
        if not getattr(self.args, 'resume', False):
            return None
        found = checkpoint_epochs(self.results_dir, pattern)
        return found[-1][1] if found else None

    def saved(self, pattern: str, key: str | tuple[str, ...]):
        """What a resumed run recorded in its latest `pattern` checkpoint under `key` (a pruning mask, an inverted
        trigger: what the defence computed before training), or {key: value} for a tuple of keys; None for a
        fresh run. A checkpoint that lacks them was not written by this defence: CheckpointError."""
        latest = self.latest(pattern)
        if latest is None:
            return None
        checkpoint = load_checkpoint(latest)
        keys = key if isinstance(key, tuple) else (key,)
        missing = [name for name in keys if name not in checkpoint]
        if missing:
            raise CheckpointError(f'{latest}: records no {", ".join(missing)} (not a checkpoint of this defence?); '
                                  'cannot resume from it')
        return {name: checkpoint[name] for name in keys} if isinstance(key, tuple) else checkpoint[key]

    def once(self, key: str | tuple[str, ...], compute: Callable[[], object], pattern: str = 'model_{}.pth'):
        """What the defence computes before it trains: the value a resumed run recorded under `key` (`saved`), else
        `compute()` — under torchrun run by rank 0 alone (which alone writes its files) and handed to every
        process, so that all train with the same one."""
        saved = self.saved(pattern, key)
        return saved if saved is not None else distributed.on_main(compute)

    def train(self, phase: Phase, images, epochs: int) -> Training:
        """Run `phase` for `epochs` on view pairs of `images`, continuing its latest checkpoint with --resume;
        returns the finished `common.engine.Training` (its `rows`, and `resumed_at`, the epoch it continued)."""
        training = Training(phase.model, phase.optimizer, self.args, epochs, self.results_dir,
                            pattern=phase.checkpoint_pattern, log_name=phase.log_name,
                            label='' if phase.log_name == 'log.csv' else phase.name, desc=phase.name,
                            writer=None if self.layout is None else lambda epoch: self.write_in_layout(
                                training, phase, epoch))
        latest = self.latest(phase.checkpoint_pattern)
        if latest is not None:
            training.resume(latest, self.must_match, weights=RESUME_WEIGHTS if self.layout else 'state_dict')
        pairs = ImagePairs(images, simclr_transform(self.normalization, images.shape[1]))
        device_images = device_copy(pairs, self.args, self.device)  # the fast path keeps D on the device
        trained = training.parallel(phase.model if phase.forward is None else phase.forward, self.device,
                                    **phase.parallel_options)
        step_loss = phase.step(trained)

        for epoch in training.loop():
            batches = pair_batches(pairs, self.args, self.normalization, epoch, self.device, device_images)
            phase.set_modes()
            row = {'epoch': epoch, **train_steps(batches, phase.optimizer, step_loss, epoch=epoch, device=self.device,
                                                 after_step=phase.after_step, lr_at=phase.lr_at,
                                                 desc=f'{phase.name} epoch {epoch}',
                                                 disable_progress=self.disable_progress)}
            training.end_epoch(row, **phase.checkpoint_extra)
        return training

    def save(self, model: torch.nn.Module, path: Path, **extra) -> None:
        """A purified encoder that trained no weight (clp, an unchanged suspect), as epoch 0: a self-describing
        checkpoint, or a real-world encoder in its suspect's layout (by rank 0 alone)."""
        if self.layout is None:
            save_run_checkpoint(path, model, None, 0, self.args, **extra)
        elif processes.is_main():
            save_in_layout(model, self.layout, path, args=vars(self.args), **extra)

    def write_in_layout(self, training: Training, phase: Phase, epoch: int) -> None:
        """The epoch's checkpoint of a real-world encoder, in its suspect's layout (models.save_in_layout): the file
        the released code loads strictly, with the run's state beside it in the released layouts (the bare and
        openai layouts hold the tower's tensors alone)."""
        save_layout_checkpoint(self.results_dir / phase.checkpoint_pattern.format(epoch), phase.model, self.layout,
                               phase.optimizer, epoch, self.args, log=training.rows, **phase.checkpoint_extra)

