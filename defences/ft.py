"""Fine-tuning (FT): continue the suspect encoder's self-supervised training on the clean subset D.

Recipe as published: the classic backdoor-removal baseline fine-tunes the suspect model on the defender's
clean data with the task's own loss (for a classifier, cross-entropy on labelled clean data; Liu et al.,
RAID 2018, use it as the second half of Fine-Pruning).
Label-free adaptation: the encoder's own task is contrastive learning, so FT continues SimCLR on D: two
augmented views per image, NT-Xent (τ = --knn-t), Adam with stage 0's weight decay (1e-6), --lr (default
1e-3, stage 0's rate), --epochs passes over D in batches of --batch_size. Every parameter, BatchNorm
included, is trained; the projection head g too, as in SimCLR.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from common.engine import nt_xent_step
from datasets.fastpath import maybe_compile
from models import SimCLR

from .training import DefenceRun, Phase

ADAM_WEIGHT_DECAY = 1e-6  # stage 0's (docs/DESIGN.md §4.3)
PAPER = 'fine-tuning baseline (e.g. Liu et al., RAID 2018), continued SimCLR training'
READS = 'the suspect and D (--ratio of its pre-training split, no label): SimCLR views of D'
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)


def trainable_copy(suspect: SimCLR) -> SimCLR:
    """A copy of the (frozen) suspect whose every parameter trains; the suspect itself is left untouched."""
    model = copy.deepcopy(suspect)
    model.requires_grad_(True)
    return model.train()


def finetune_phase(model: SimCLR, run: DefenceRun, name: str = 'Fine-tune', checkpoint_pattern: str = 'model_{}.pth',
                   log_name: str = 'log.csv', after_step=None, extra=None, checkpoint_extra=None) -> Phase:
    """SimCLR training of `model` on D as a phase (Adam, lr --lr, weight decay 1e-6): SimCLR's step
    (`common.engine.nt_xent_step`; under torchrun its NT-Xent takes its negatives from the global batch).
    `extra(x1, x2, taps_1) -> {name: (weight, value)}` adds defence-specific terms from the same first forward
    pass (NAD's attention transfer)."""
    args = run.args
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=ADAM_WEIGHT_DECAY)
    return Phase(name, model, optimizer, lambda trained: nt_xent_step(trained, args.knn_t, run.device, args.amp, extra),
                 model.train, forward=maybe_compile(model, args.compile), checkpoint_pattern=checkpoint_pattern,
                 log_name=log_name, after_step=after_step, checkpoint_extra=checkpoint_extra or {})


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    model = trainable_copy(suspect)
    run.train(finetune_phase(model, run), clean, run.args.epochs)
    return model, {'epochs': run.args.epochs}
