"""The parent argument parser, the flag checks and the seed set-up every stage shares.

Expected mistakes (bad files, bad flags) raise the errors of `core.errors`, which `core.cli.run_main` turns into one
line on stderr and exit status 2; they never print a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from core import processes
from core.cli import same_on_resume
from core.errors import NonFiniteLossError, UsageError
from models import ARCHITECTURES, FAMILIES, USAGE_INFO_FAMILIES, resolve_family


def shared_parser() -> argparse.ArgumentParser:
    """Flags every stage has, for `argparse.ArgumentParser(parents=[shared_parser()])`."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group('shared options')
    group.add_argument('--data_dir', default='', type=str, metavar='DIR',
                       help="folder holding <split>.npz of the stage's main dataset, or a folder of images of any "
                            'size (flat: unlabelled; <class>/ sub-folders: labelled; a downstream task: train/<class>/ '
                            "and test/<class>/), resized to the encoder's input (default: <data_root>/<dataset>/)")
    group.add_argument('--data_root', default='data', type=str, metavar='DIR',
                       help='folder holding one sub-folder per prepared dataset (default: data)')
    group.add_argument('--results_dir', default='', type=str, metavar='PATH',
                       help='folder for checkpoints, logs and metrics')
    same_on_resume(group.add_argument('--seed', default=100, type=int, help='random seed of the run'))
    group.add_argument('--gpu', default='0', type=str,
                       help='which CUDA device to use when --device is auto or cuda (as the original)')
    group.add_argument('--device', default='auto', type=str, metavar='auto|cpu|cuda|cuda:N',
                       help='where to run: auto picks CUDA when present (default: auto)')
    same_on_resume(group.add_argument('--num_workers', default=2, type=int,
                                      help='DataLoader worker processes for augmentation (default: 2)'))
    group.add_argument('--resume', action='store_true',
                       help='continue from the latest checkpoint in --results_dir')
    group.add_argument('--overwrite', action='store_true',
                       help='allow replacing checkpoints an earlier run left in --results_dir')
    group.add_argument('--amp', action='store_true',
                       help='bf16 autocast on CUDA (ignored on the CPU; default: off, full precision)')
    group.add_argument('--deterministic', action='store_true',
                       help='deterministic cuDNN/cuBLAS kernels and no autotuning: bit-reproducible GPU runs at '
                            'some speed cost (CPU runs are reproducible either way)')
    group.add_argument('--no_progress', action='store_true', help='hide the progress bars')
    return parser


def add_arch_argument(container, same_on_resume_too: bool = True) -> argparse.Action:
    """`--arch`: the encoder family of a real-world encoder (models.FAMILIES), beside --encoder_usage_info CLIP|imagenet
    (the released code's names); a CIFAR-style architecture is checked against the checkpoint."""
    action = container.add_argument(
        '--arch', default='', choices=('', *FAMILIES, *ARCHITECTURES), metavar='FAMILY',
        help='the encoder family, for a real-world encoder whose file does not say (one of '
             f"{', '.join(FAMILIES)}; --encoder_usage_info {'|'.join(USAGE_INFO_FAMILIES)} names two of them); "
             "a CIFAR SimCLR's architecture (resnet18, ...) is checked against its checkpoint (default: read off the file)")
    return same_on_resume(action) if same_on_resume_too else action


def encoder_family(args: argparse.Namespace) -> str | None:
    """The real-world encoder family --encoder_usage_info and --arch ask for (models.resolve_family); None: the file
    decides (a CIFAR SimCLR, or a real-world encoder read off its keys)."""
    try:
        return resolve_family(getattr(args, 'encoder_usage_info', '') or None, getattr(args, 'arch', '') or None)
    except ValueError as error:
        raise UsageError(str(error)) from None


def data_dir_for(args: argparse.Namespace, name: str, primary: bool = True) -> Path:
    """Where dataset `name` lives: --data_dir for the stage's main dataset, else <data_root>/<name>/."""
    if primary and getattr(args, 'data_dir', ''):
        return Path(args.data_dir)
    return Path(getattr(args, 'data_root', 'data') or 'data') / name


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed once at the top of main(): python, numpy and torch (all devices); choose the CUDA kernels.

    By default cuDNN autotunes its kernels (fast, not bit-reproducible on a GPU); `deterministic` selects
    deterministic kernels instead, as the original code always did.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def check_save_freq(save_freq: int) -> None:
    """--save_freq: 0 (a checkpoint at the end only) or a positive number of epochs."""
    if save_freq < 0:
        raise UsageError(f'--save_freq must be 0 (only at the end) or positive, got {save_freq}')


def require_positive(name: str, value: float) -> None:
    if value < 1:
        raise UsageError(f'{name} must be at least 1, got {value}')


def print_args(args: argparse.Namespace) -> None:
    print(json.dumps(vars(args), sort_keys=True, default=str))


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f'non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; '
                                 'stopped, the last checkpoint is intact')


def progress_disabled(args: argparse.Namespace) -> bool:
    """--no_progress, TQDM_DISABLE=1, or a process of a torchrun job other than rank 0."""
    return bool(getattr(args, 'no_progress', False)) or os.environ.get('TQDM_DISABLE') == '1' or processes.launched_rank() != 0
