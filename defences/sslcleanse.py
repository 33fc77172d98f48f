"""SSL-Cleanse's mitigation (Zheng, Xue, Jia, Lou et al., "SSL-Cleanse: Trojan Detection and Mitigation in
Self-Supervised Learning", ECCV 2024) after DECREE's trigger inversion (`defences/invert.py`, shared with `invert`).

The recipe as published (github.com/UCF-ML-Research/SSL-Cleanse, `mitigator/core/train.py`, `methods/byol.py`,
`norm_mse.py`, `cfg.py` and the README's command): a student initialised from the suspect is trained on the
defender's clean data towards a frozen copy of the suspect, the teacher (the BYOL target with `--byol_tau 1`, so
it never moves). Each image gives two clean views x1, x2 and a view carrying the inverted trigger; with
N(a, b) = 2 − 2·mean_b cos(a_b, b_b) (`norm_mse_loss`) the loss is
    L = [α₁ · 2·N(S_g(x1), T_g(x2)) + α₄ · (N(S_f(x̃), T_f(x')) + N(S_g(x̃), T_g(x')))] / 6
where S_f, T_f are the encoders' features, S_g, T_g their projections, x̃ the triggered view given to the student
and x' a clean view given to the teacher: the clean term keeps the student's embedding of clean images where the
teacher has it, the trigger term maps the student's triggered view onto the teacher's clean one. The code counts
the clean pair twice and divides by the 6 pairs of its 4 views; α₁ = α₄ = 1. Adam (weight decay 1e-6) at lr 3e-3
(the README's; cfg's default is 1e-3), a linear warm-up over the first 500 steps, and the rate ×0.2 for the last 50
and again for the last 25 epochs (`--drop 50 25`; a drop at or before epoch 0 never happens); the whole module is in
training mode, so the teacher's BatchNorm normalises with each batch's statistics as the student's does.

Adaptation to a SimCLR suspect: SSL-Cleanse's mitigator runs BYOL (a predictor on the student's projection); a
SimCLR encoder has no predictor, so the student's projection is compared with the teacher's directly. The views are
the pair every defence trains on: x1 and x2 clean for the clean term, and for the trigger term the student sees x2
with the inverted trigger stamped on (x̃ = stamp(x2)) and the teacher the clean x1 — two views of the same image.
(The released code's teacher view in the trigger term is a clean view of an image drawn from the "labelled" part of
a file list the repository does not generate; the same image's other view is our reading.) The batch is --batch_size
(the README's 1536 is a GPU batch), the epochs --epochs (the README's 500).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from core.cli import same_on_resume
from core.device import autocast
from core.errors import UsageError
from models import SimCLR

from .ft import ADAM_WEIGHT_DECAY, trainable_copy
from .invert import stamp, trigger_to_unlearn, unchanged
from .training import DefenceRun, Phase

PAPER = 'SSL-Cleanse (Zheng et al., ECCV 2024) mitigation after DECREE (Feng et al., CVPR 2023) inversion'
READS = 'the suspect and D: D for the inversion, then SimCLR views of D, distilled from a frozen copy of the suspect'
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
TITLE = 'sslcleanse (SSL-Cleanse mitigation after DECREE inversion; the inversion flags are invert\'s)'
SSLCLEANSE_SETTINGS = {'clean_weight': 1.0, 'trigger_weight': 1.0, 'warmup_steps': 500, 'drops': (50, 25),
                       'drop_factor': 0.2, 'pairs': 6}  # the released code's (pairs: of its 4 views)


def norm_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSL-Cleanse's `norm_mse_loss`: 2 − 2·mean_b cos(a_b, b_b), a and b (B, d) -> scalar in [0, 4]."""
    return 2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1).mean()


def sslcleanse_loss(student_clean_proj: torch.Tensor, teacher_other_proj: torch.Tensor,
                    student_triggered: tuple[torch.Tensor, torch.Tensor], teacher_clean: tuple[torch.Tensor, torch.Tensor],
                    clean_weight: float = 1.0, trigger_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L = [α₁·2·N(S_g(x1), T_g(x2)) + α₄·(N(S_f(x̃), T_f(x')) + N(S_g(x̃), T_g(x')))] / 6 (module docstring).

    `student_triggered` and `teacher_clean` are (feature, projection) pairs, each (B, d) and (B, D). Returns the
    loss and its unweighted terms {'loss_clean', 'loss_trigger'} (each with the code's 1/6).
    """
    pairs = SSLCLEANSE_SETTINGS['pairs']
    loss_clean = 2 * norm_mse(student_clean_proj, teacher_other_proj) / pairs
    loss_trigger = (norm_mse(student_triggered[0], teacher_clean[0])
                    + norm_mse(student_triggered[1], teacher_clean[1])) / pairs
    return clean_weight * loss_clean + trigger_weight * loss_trigger, {'loss_clean': loss_clean,
                                                                        'loss_trigger': loss_trigger}


def lr_factor(step: int, epoch: int, epochs: int, warmup_steps: int = SSLCLEANSE_SETTINGS['warmup_steps'],
              drops: tuple[int, ...] = SSLCLEANSE_SETTINGS['drops'],
              drop_factor: float = SSLCLEANSE_SETTINGS['drop_factor']) -> float:
    """The factor of the learning rate at optimiser step `step` (0-based) in epoch `epoch` (0-based) of `epochs`:
    min(1, (step + 1)/warmup_steps) · drop_factor^#{d ∈ drops : 0 < epochs − d ≤ epoch} (the code's warm-up and
    MultiStepLR at milestones epochs − d)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    dropped = sum(1 for d in drops if 0 < epochs - d <= epoch)
    return warmup * drop_factor ** dropped


def distillation_step(student: SimCLR, teacher: SimCLR, mask: torch.Tensor, pattern_normalised: torch.Tensor,
                      run: DefenceRun):
    """SSL-Cleanse's step as a phase's step_loss(x1, x2) (4 forwards: the student on x1 and stamp(x2), the teacher,
    no grad, on x2 and x1); `student` as the step calls it (under torchrun, its DistributedDataParallel wrapper)."""
    args = run.args

    def step_loss(x1: torch.Tensor, x2: torch.Tensor):
        with autocast(run.device, args.amp):
            _, proj_s1 = student(x1)
            feature_st, proj_st = student(stamp(x2, mask, pattern_normalised))
            with torch.no_grad():
                _, proj_t2 = teacher(x2)
                feature_t1, proj_t1 = teacher(x1)
        return sslcleanse_loss(proj_s1.float(), proj_t2.float(), (feature_st.float(), proj_st.float()),
                               (feature_t1.float(), proj_t1.float()), args.sslcleanse_clean_weight,
                               args.sslcleanse_trigger_weight)
    return step_loss


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    """DECREE's inversion on D (shared with invert), its verdict, then SSL-Cleanse's distillation."""
    args = run.args
    report, trigger = trigger_to_unlearn(suspect, clean, run, 'sslcleanse')
    if trigger is None:
        return unchanged(suspect, run, report)
    saved, mask, pattern_normalised = trigger
    student = trainable_copy(suspect)
    teacher = copy.deepcopy(suspect).requires_grad_(False)  # frozen: BYOL's target at tau 1
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=ADAM_WEIGHT_DECAY)
    steps_per_epoch = max(1, len(clean) // args.batch_size)

    def set_modes() -> None:  # the released code trains the whole module: both networks in training mode
        student.train()
        teacher.train()

    def lr_at(epoch: int, step: int) -> float:  # the code's warm-up and drops, by the run's step (from 0)
        return args.lr * lr_factor((epoch - 1) * steps_per_epoch + step, epoch - 1, args.epochs,
                                   args.sslcleanse_warmup)
    phase = Phase('SSL-Cleanse', student, optimizer,
                  lambda trained: distillation_step(trained, teacher, mask, pattern_normalised, run), set_modes,
                  lr_at=lr_at, checkpoint_extra={'inverted_trigger': saved})
    run.train(phase, clean, args.epochs)
    return student, {**report, 'epochs': args.epochs, 'unlearned': True,
                     'weights': {'clean': args.sslcleanse_clean_weight, 'trigger': args.sslcleanse_trigger_weight}}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    same_on_resume(group.add_argument(
        '--sslcleanse_clean_weight', default=SSLCLEANSE_SETTINGS['clean_weight'], type=float,
        help="α₁, weight of the clean distillation term (default: 1, SSL-Cleanse's --alpha_1)"))
    same_on_resume(group.add_argument(
        '--sslcleanse_trigger_weight', default=SSLCLEANSE_SETTINGS['trigger_weight'], type=float,
        help="α₄, weight of the triggered-student / clean-teacher term (default: 1, SSL-Cleanse's --alpha_4)"))
    same_on_resume(group.add_argument(
        '--sslcleanse_warmup', default=SSLCLEANSE_SETTINGS['warmup_steps'], type=int,
        help="steps of the linear learning-rate warm-up (default: 500, SSL-Cleanse's; 0: none)"))


def check(args: argparse.Namespace) -> None:
    if not (args.sslcleanse_clean_weight >= 0 and args.sslcleanse_trigger_weight >= 0) \
            or args.sslcleanse_clean_weight + args.sslcleanse_trigger_weight == 0:
        raise UsageError('--sslcleanse_clean_weight and --sslcleanse_trigger_weight must be non-negative and not both 0, '
                         f'got {args.sslcleanse_clean_weight} and {args.sslcleanse_trigger_weight}')
    if args.sslcleanse_warmup < 0:
        raise UsageError(f'--sslcleanse_warmup must be 0 (none) or positive, got {args.sslcleanse_warmup}')
