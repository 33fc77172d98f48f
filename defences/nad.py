"""Neural Attention Distillation (NAD; Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021).

Recipe as published: (1) fine-tune a copy of the backdoored network on the defender's small clean set (5%
of the training data) to get a teacher (10 epochs in the released code); (2) train the backdoored network
itself, the student, on the same data with its task loss plus β-weighted attention distillation from the
teacher at the end of each residual group, AT(F) = normalise(mean_c F_c^p), p = 2 (20 epochs). The released
code's CIFAR values for the three groups of its WRN-16-1 are β = 500, 1000, 1000 (`--beta1/2/3`).
Label-free adaptation: both losses of a classifier become the encoder's own, NT-Xent on two views of D:
the teacher is `ft` of the suspect (`--nad_teacher_epochs`, default half of --epochs, NAD's 10 of 20), and
the student, a copy of the suspect, minimises NT-Xent + Σ_l β_l·AT(S_l(x1), T_l(x1)). NAD's code puts its three β
at the ends of its WRN's three residual groups, i.e. at the end of every stage; a ResNet encoder has four stages,
and we give the three β to its last three (layer2..layer4), layer1 none: `--nad_betas 0,500,1000,1000`. (BackdoorBench's
port to PreAct-ResNet18, `defense/nad.py`, places them otherwise: β1..β3 on layer3, layer4 and the pooled output.) The attention map is the
project's `attention_transfer` (MIMIC's: Σ_c |F_c|^2 normalised over positions, which equals NAD's
normalise(mean_c F_c^2) up to its 1e-6 guard, since the constant 1/C cancels in the normalisation).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from core.cli import same_on_resume
from core.errors import UsageError
from models import SimCLR
from models.losses import attention_transfer

from .ft import finetune_phase, trainable_copy
from .training import DefenceRun

PAPER = 'Li et al., Neural Attention Distillation, ICLR 2021'
READS = "the suspect and D: SimCLR views of D for the teacher's fine-tuning and the distillation"
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth', 'teacher_{}.pth')  # the purified encoder's, then its fine-tuned teacher's
TITLE = 'nad (Neural Attention Distillation)'  # of its argument group in baseline_defence.py's help
NAD_BETAS = (0.0, 500.0, 1000.0, 1000.0)  # layer1..layer4; the released code's CIFAR β on the last three


def attention_terms(teacher: SimCLR, betas: list[float]):
    """extra(x1, x2, student_taps) for `finetune_phase` (`common.engine.nt_xent_step`): {'loss_at<l>': (β_l, AT(S_l(x1), T_l(x1)))} for each
    tapped layer with β_l ≠ 0; one no-grad teacher forward on x1 per step."""
    def extra(x1: torch.Tensor, x2: torch.Tensor, student_taps: list[torch.Tensor]) -> dict:
        with torch.no_grad():
            _, _, teacher_taps = teacher(x1, return_taps=True)
        return {f'loss_at{index}': (beta, attention_transfer(tap_s.float(), tap_t.float()))
                for index, (beta, tap_s, tap_t) in enumerate(zip(betas, student_taps, teacher_taps), start=1)
                if beta != 0}
    return extra


def teacher_epochs(args) -> int:
    return args.nad_teacher_epochs if args.nad_teacher_epochs else max(1, args.epochs // 2)


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    args = run.args
    # (1) the teacher: fine-tuning of the suspect, in its own checkpoints and log
    teacher = trainable_copy(suspect)
    run.train(finetune_phase(teacher, run, name='NAD teacher', checkpoint_pattern='teacher_{}.pth',
                             log_name='teacher_log.csv'), clean, teacher_epochs(args))
    teacher.eval().requires_grad_(False)
    # (2) the student: the suspect, with attention distillation from the teacher
    student = trainable_copy(suspect)
    # the teacher stays in eval mode (set above); the phase puts only the student in training mode
    phase = finetune_phase(student, run, name='NAD student', extra=attention_terms(teacher, args.nad_betas))
    run.train(phase, clean, args.epochs)
    return student, {'epochs': args.epochs, 'teacher_epochs': teacher_epochs(args), 'betas': list(args.nad_betas)}


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    same_on_resume(group.add_argument(
        '--nad_betas', default=list(NAD_BETAS), type=float_list, metavar='B1,B2,B3,B4',
        help="attention-distillation weights of layer1..layer4 (default: 0,500,1000,1000: NAD's CIFAR β on the last "
             'three stages)'))
    same_on_resume(group.add_argument(
        '--nad_teacher_epochs', default=0, type=int,
        help="epochs of the teacher's fine-tuning (default: 0 = half of --epochs, NAD's 10 of 20)"))


def check(args: argparse.Namespace) -> None:
    if len(args.nad_betas) != 4 or any(beta < 0 for beta in args.nad_betas):
        raise UsageError(f'--nad_betas: expected 4 non-negative weights (layer1..layer4), got {args.nad_betas}')
    if args.nad_teacher_epochs < 0:
        raise UsageError(f'--nad_teacher_epochs must be 0 (half of --epochs) or positive, got {args.nad_teacher_epochs}')
