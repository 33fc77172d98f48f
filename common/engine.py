"""The one training engine: the step loop, the epoch loop's bookkeeping, and the one way a run resumes.

Every stage that trains runs through it (docs/DESIGN.md §1.4, §2.4): stage 0's SimCLR, stage 1's attacks, MIMIC's
distillation and the baselines' phases in stage 2, and stage 3's probe. A stage writes its epoch loop itself, the
way a reader expects it on the page:

    for epoch in training.loop():                        # start_epoch..epochs, a progress bar
        row = {'epoch': epoch, **train_one_epoch(...)}   # train_steps over the epoch's batches
        row.update(evaluate(...))                        # a kNN monitor, the probe's ACC/ASR, ...
        training.end_epoch(row)                          # log, checkpoint when due, barrier

`train_steps` runs one epoch's steps, `step_loss(*batch) -> (loss, {term: value})` each. `Training.end_epoch`
logs the row (the CSV rewritten atomically, one JSON line printed), writes a resumable checkpoint every --save_freq
epochs and after the last (`common.runs.save_run_checkpoint`, with what a resumed run needs besides the weights),
and holds a barrier so that under torchrun the epoch is on disk before any process starts the next.
`Training.resume` is the one resume path: it refuses a checkpoint whose flags marked `same_on_resume` differ from
the command line's, and restores the weights, the optimiser, the epoch, the log and the RNG states, so that the
data order and the augmentations, which depend only on (seed, epoch), continue bit for bit.
`Training.parallel` is the one place a trained network gets its DistributedDataParallel wrapper under torchrun.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from core.device import autocast
from core.errors import NonFiniteLossError
from models import load_checkpoint
from models.checkpoint import load_state_into

from . import distributed
from .cli import check_finite, progress_disabled
from .runs import (check_resumable, is_save_epoch, read_csv, restore_optimizer, save_run_checkpoint, set_rng_state,
                   write_csv)

StepLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_steps(batches: Iterable, optimizer: torch.optim.Optimizer, step_loss: StepLoss, *, epoch: int,
                device: torch.device, after_step: Callable[[], None] | None = None,
                lr_at: Callable[[int, int], float] | None = None, per_image: bool = False, desc: str = 'Train',
                disable_progress: bool = False) -> dict[str, float]:
    """One pass over `batches` (tuples of tensors, moved to `device`): loss, backward, optimiser step.

    Returns the epoch's mean of the loss and of each term, over the steps, or with `per_image` over the images
    (each step's value weighted by its batch size B_s, the length of the batch's last tensor, its labels:
    Σ_s B_s·v_s / Σ_s B_s, for a last partial batch); a term
    may be a vector (one loss per probe of a group). Under torchrun each step's loss and terms are first averaged
    over the processes (the global batch's). A non-finite loss stops the run, naming the epoch and the step
    (counted from 1). The caller puts the networks in their train/eval modes first. `after_step()` runs after
    every optimiser step (a pruning mask re-applied); `lr_at(epoch, step)`, a per-step schedule, gives the
    learning rate of each step (counted from 0 within the epoch), set on every parameter group before it.

    The sums are kept on the device in float64 (the same numbers as Python floats of the float32 values). On the
    CPU each step's loss is checked and shown as it comes; on CUDA the host stays out of the step loop: the first
    non-finite step is recorded on the device and read, with the means, once at the end of the epoch (the epoch's
    remaining steps run on a non-finite model; nothing of that epoch is saved).
    """
    each_step = torch.device(device).type != 'cuda'  # the CPU has no kernel queue to keep full
    totals: dict[str, torch.Tensor] = {}
    count = 0
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss finite so far
    bar = tqdm(batches, desc=desc, leave=False, disable=disable_progress)
    for step, batch in enumerate(bar, start=1):
        batch = [tensor.to(device, non_blocking=True) for tensor in batch]
        if lr_at is not None:
            for group in optimizer.param_groups:
                group['lr'] = lr_at(epoch, step - 1)
        loss, terms = step_loss(*batch)
        reported = distributed.mean_over_ranks({'loss': loss, **terms})  # {'loss': loss, **terms} in one process
        if each_step:
            check_finite(reported['loss'], epoch, step)
        else:
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(reported['loss'].detach()).all(),
                                    step, first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        weight = len(batch[-1]) if per_image else 1  # the batch's labels: B_s, also for stacked (N, B, d) inputs
        count += weight
        for name, value in reported.items():
            value = value.detach().double() * weight
            totals[name] = totals[name] + value if name in totals else value
        if each_step and not disable_progress:
            bar.set_postfix(loss=f'{totals["loss"].sum().item() / count:.4f}')
    if not each_step and first_bad.item():
        raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, step {first_bad.item()}; stopped, the last '
                                 'checkpoint is intact')
    return {name: (total / count).tolist() for name, total in totals.items()}


def nt_xent_step(forward: torch.nn.Module, temperature: float, device: torch.device, amp: bool = False,
                 extra: Callable | None = None) -> StepLoss:
    """SimCLR's step: NT-Xent of the projections of two augmented views (docs/DESIGN.md §4.2), one forward each.

    `forward` is the SimCLR as called (its DistributedDataParallel or torch.compile wrapper, if any); under
    torchrun the NT-Xent takes its negatives from the global batch. `extra(x1, x2, taps_1) -> {name: (weight,
    value)}` adds weighted terms computed from the first view's forward pass (its tapped maps are taken from that
    same pass only when `extra` is given).
    """
    def step_loss(x1: torch.Tensor, x2: torch.Tensor):
        with autocast(device, amp):
            if extra is None:
                _, out_1 = forward(x1)
                taps_1 = None
            else:
                _, out_1, taps_1 = forward(x1, return_taps=True)
            _, out_2 = forward(x2)
        terms = {'loss_con': distributed.nt_xent(out_1.float(), out_2.float(), temperature)}
        loss = terms['loss_con']
        if extra is not None:
            for name, (weight, value) in extra(x1, x2, taps_1).items():
                terms[name] = value
                loss = loss + weight * value
        return loss, terms
    return step_loss


def print_row(row: dict) -> None:
    """The default report of an epoch: its log row as one JSON line, blank columns left out."""
    tqdm.write(json.dumps({key: value for key, value in row.items() if value != ''}))


@dataclass
class Training:
    """One training run of a stage: what is trained, where it is written, and the epochs run so far.

    `model` is what the checkpoints hold: the trained module itself, never its DistributedDataParallel or
    torch.compile wrapper. `args` is recorded in every checkpoint and its `save_freq` spaces them. With
    `results_dir` None nothing is written (a probe without --results_dir). `log_name` None keeps no CSV log.
    `label` names a phase of a defence that trains in several (its lines then carry `"phase"`); `columns` are the
    log's columns when not every epoch has every value (stage 1: '' where the monitor did not run).
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    args: argparse.Namespace
    epochs: int
    results_dir: Path | None
    pattern: str = 'model_{}.pth'
    log_name: str | None = 'log.csv'
    label: str = ''
    columns: tuple[str, ...] = ()
    desc: str = 'Epochs'
    writer: Callable[[int], None] | None = None  # writes epoch's checkpoint(s) itself (a probe group: one per probe)
    start_epoch: int = 1  # the first epoch still to run
    resumed_at: int = 0  # the epoch a resumed run continued from (0: a fresh run)
    rows: list[dict] = field(default_factory=list)  # the log rows of the epochs run so far

    def parallel(self, module: torch.nn.Module, device: torch.device, **options) -> torch.nn.Module:
        """What the step calls to run `module` (the trained network, a part of it, or its torch.compile wrapper):
        `module` itself in one process; under torchrun its DistributedDataParallel wrapper
        (`common.distributed.data_parallel` with `options`: sync_batchnorm, find_unused_parameters,
        broadcast_buffers). Every stage wraps what it trains here, once, before its epoch loop."""
        return distributed.data_parallel(module, device, **options)

    def resume(self, path: Path, must_match: dict[str, object], *, weights: str = 'state_dict') -> dict:
        """Continue the run that wrote checkpoint `path`; returns the checkpoint, for the stage's own keys.

        `must_match` is {flag: default} of the flags that shape the run (`core.cli.resume_flags`): a checkpoint
        recording other values is refused (one recording none for a flag ran with its default). The weights come
        from `checkpoint[weights]` (DRUPE's last epoch: `last_state_dict`), else its `state_dict`; the log from the
        checkpoint, else the CSV, up to its epoch; the RNG states are restored last, after everything that
        builds or loads a network, so that the next epoch draws what it would have drawn.
        """
        checkpoint = load_checkpoint(path)
        check_resumable(checkpoint, self.args, path, must_match)
        load_state_into(self.model, checkpoint.get(weights, checkpoint.get('state_dict')), path)
        epoch = restore_optimizer(self.optimizer, checkpoint, path)
        rows = checkpoint.get('log') or (read_csv(self.results_dir / self.log_name)
                                         if self.log_name and self.results_dir else [])
        self.rows = [row for row in rows if int(row['epoch']) <= epoch]
        set_rng_state(checkpoint['rng'])
        self.continue_after(epoch)
        print(f'resuming {self.label + " " if self.label else ""}from {path} (epoch {epoch})')
        return checkpoint

    def continue_after(self, epoch: int) -> None:
        """The epochs still to run are those after `epoch`, the one the restored state was saved at."""
        self.resumed_at, self.start_epoch = epoch, epoch + 1

    @property
    def finished(self) -> bool:
        return self.start_epoch > self.epochs

    def log(self, row: dict, report: Callable[[dict], None] = print_row) -> None:
        """Append one epoch's row (blank in the columns it lacks), rewrite the CSV, report it."""
        row = {**{column: '' for column in self.columns}, **row}
        self.rows.append(row)
        if self.log_name and self.results_dir is not None:
            write_csv(self.results_dir / self.log_name, self.rows)
        report({'phase': self.label, **row} if self.label else row)

    def loop(self) -> Iterator[int]:
        """The epochs still to run, start_epoch..epochs, under a progress bar; the stage's loop body trains one,
        evaluates it and ends it with `end_epoch`:

            for epoch in training.loop():
                row = {'epoch': epoch, **train_one_epoch(...)}
                row.update(evaluate(...))
                training.end_epoch(row)
        """
        self._bar = tqdm(range(self.start_epoch, self.epochs + 1), desc=self.label or self.desc,
                         initial=self.start_epoch - 1, total=self.epochs, disable=progress_disabled(self.args))
        yield from self._bar

    def end_epoch(self, row: dict, report: Callable[[dict], None] = print_row, **checkpoint_keys) -> None:
        """The end of epoch row['epoch']: its row logged (`log`), the checkpoint written when it is a save epoch
        (every --save_freq epochs and the last; `writer`, else `save_run_checkpoint` with `checkpoint_keys`, what a
        resumed run needs besides the weights), then a barrier, so that under torchrun the epoch is on disk
        before any process starts the next."""
        epoch = row['epoch']
        self.log(row, report)
        numbers = [(key, value) for key, value in row.items() if key != 'epoch' and isinstance(value, float)]
        if getattr(self, '_bar', None) is not None:
            self._bar.set_postfix({key: f'{value:.4f}' for key, value in numbers[:3]})
        if self.results_dir is not None and is_save_epoch(epoch, self.epochs, self.args.save_freq):
            if self.writer is not None:
                self.writer(epoch)
            else:
                save_run_checkpoint(self.results_dir / self.pattern.format(epoch), self.model, self.optimizer,
                                    epoch, self.args, log=self.rows, **checkpoint_keys)
        distributed.barrier()
        self.start_epoch = epoch + 1
