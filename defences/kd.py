"""Plain knowledge distillation (KD), the distillation defence of Saha, Tejankar, Koohpayegani and Pirsiavash
("Backdoor Attacks on Self-Supervised Learning", CVPR 2022, §5).

Recipe as published: distil the (possibly backdoored) encoder into a fresh student on a small clean set; the
paper uses CompRess, which matches the student's similarities to a memory bank with the teacher's, and
reports that the backdoor does not survive the transfer.
Adaptation: the baseline MIMIC is compared with is distillation *without* MIMIC's additions: a randomly
initialised student of the suspect's architecture, trained on augmented views of D to match the suspect's
features, L = −mean_b cos(S(x1), T(x1)) (MIMIC's clone loss), with no attention transfer, no MI weights
and no contrastive term. It runs through MIMIC's own distillation step with those terms switched off, so
the two differ by exactly those terms. The feature-matching loss replaces CompRess's memory-bank similarity
matching: both transfer the teacher's embedding geometry; direct matching needs no bank, which D (a few
thousand images) is too small to fill as CompRess does. Adam, --lr (default 1e-2 for this fresh student,
as the MIMIC README's), weight decay 1e-6.
"""
from __future__ import annotations

import numpy as np
import torch

from datasets.fastpath import maybe_compile
from models import SimCLR

from .mimic import build_student, distillation_modes, distillation_step
from .training import DefenceRun, Phase

PAPER = 'Saha et al., Backdoor Attacks on Self-Supervised Learning, CVPR 2022 (distillation defence)'
READS = 'the suspect and D: SimCLR views of D, distilled into a fresh student'
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
NO_ATTENTION = [0.0, 0.0, 0.0, 0.0]


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    args = run.args
    student = build_student(suspect, '', run.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-6)
    teacher_forward = maybe_compile(suspect, args.compile)

    def step(trained: torch.nn.Module):
        return distillation_step(trained, teacher_forward, NO_ATTENTION, 1.0, args.knn_t, run.device, args.amp,
                                 contrastive_weight=0.0)
    # no contrastive term: the student's projection head gets no gradient, which DDP is told
    run.train(Phase('KD', student, optimizer, step, distillation_modes(student, suspect),
                    forward=maybe_compile(student, args.compile), parallel_options={'find_unused_parameters': True}),
              clean, args.epochs)
    return student, {'epochs': args.epochs}
