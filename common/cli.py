"""The parent argument parser, device/seed set-up and the error handling every stage shares.

Expected mistakes (bad files, bad flags) end the run with one line on stderr and exit status 2;
they never print a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models import ARCHITECTURES, FAMILIES, USAGE_INFO_FAMILIES, resolve_family

from . import distributed
from .errors import EXPECTED_ERRORS, NonFiniteLossError, UsageError


class StageParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`<prog>: error: ...`), exit status 2, like every other
    expected mistake; `--help` shows the full usage."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def same_on_resume(action: argparse.Action) -> argparse.Action:
    """Mark a flag that shapes a run's trajectory: `--resume` refuses a value other than the interrupted run's.

    Declared where the flag is, `same_on_resume(parser.add_argument('--lr', ...))` or through `SameOnResume`; the
    training engine reads the marks (`resume_flags`), so no list of such flags is kept by hand (docs/DESIGN.md §2.4).
    """
    action.same_on_resume = True
    return action


class SameOnResume:
    """`same = SameOnResume(parser or argument group)`; `same.add_argument(...)` adds the flag there and marks it
    `same_on_resume`."""

    def __init__(self, container):
        self.container = container

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        return same_on_resume(self.container.add_argument(*names, **kwargs))


def resume_flags(parser: argparse.ArgumentParser) -> dict[str, object]:
    """{dest: default} of the flags `parser` marks with `same_on_resume` (its parents' and groups' included).

    A checkpoint whose recorded arguments lack one of them was written before the flag existed, so it ran with
    the flag's default: a resumed run compares against that default.
    """
    return {action.dest: action.default for action in parser._actions if getattr(action, 'same_on_resume', False)}


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


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message quoting a library error may span several)."""
    return ' '.join(line.strip() for line in str(error).splitlines() if line.strip())


def caused_by_interrupt(error: BaseException) -> bool:
    """True for a KeyboardInterrupt, or an error raised while one was being handled (a library's
    cleanup failing on the way out of an interrupted call hides the Ctrl-C behind its own exception)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(); expected errors become one line on stderr and exit status 2.

    Under torchrun (common.distributed) only rank 0 prints; a failure ends each process with at most one line
    (Ctrl-C, bad flags or files and a non-finite loss from rank 0 alone; a crash, or a collective that failed
    because another process stopped, from each process it hit, with its rank), exit status 1 for the latter,
    and torchrun's failure summary gets the error with its traceback.
    """
    distributed.quiet_unless_main()
    joined = False
    try:
        main()
        joined = distributed.is_distributed()
        distributed.teardown()
    except BaseException as error:
        # An interrupt first: an error raised while one was handled (a truncated read reported as an unreadable
        # checkpoint, say) is the interrupt's doing, not the file's.
        if caused_by_interrupt(error):
            leave_interrupted()
        torchrun = distributed.launched_world_size() > 1
        for kind, status in ((EXPECTED_ERRORS, 2), (NonFiniteLossError, 3)):
            if isinstance(error, kind):
                distributed.record_for_torchrun(error)
                distributed.report_error(f'error: {one_line(error)}', same_on_every_process=True)
                if distributed.is_distributed():  # its threads would be torn down at finalisation (teardown)
                    distributed.leave_process(status)
                sys.exit(status)
        if torchrun and isinstance(error, Exception):
            leave_failed(error)
        raise
    if joined:  # a torchrun process ends without finalisation, where gloo's leftover threads may abort it
        distributed.leave_process(0)


def leave_failed(error: Exception) -> None:
    """End a process of a torchrun job after an unexpected error: one line, the traceback to torchrun's summary.

    A collective that failed because another process went away is reported by rank 0 alone. torchrun forwards a
    Ctrl-C to its processes one after the other, so such a failure may be the first sign of an interrupt that is
    about to arrive: it is waited for, briefly, and then reported as the interrupt it is.
    """
    collateral = distributed.collective_failed(error)
    if collateral:
        try:
            time.sleep(distributed.INTERRUPT_GRACE_S)
        except KeyboardInterrupt:
            leave_interrupted()
    distributed.record_for_torchrun(error)
    cause = ' (a collective failed: another process stopped, or --dist_timeout passed)' if collateral else ''
    distributed.report_error(f'error: {type(error).__name__}: {one_line(error)}{cause}',
                             same_on_every_process=collateral)
    # Leave at once, as after an interrupt: a collective left unfinished would only add the process group's
    # warnings, and half-started DataLoader iterators their tracebacks, to the one line.
    distributed.leave_process(1)


def leave_interrupted() -> None:
    print('interrupted: stopped by the user; checkpoints already written are intact '
          '(stages that save checkpoints continue with --resume)', file=sys.stderr)
    # Leave at once: every file was written atomically, and the interpreter's teardown would only let
    # half-started DataLoader iterators print tracebacks from their destructors.
    distributed.leave_process(130)


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f'non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; '
                                 'stopped, the last checkpoint is intact')


def progress_disabled(args: argparse.Namespace) -> bool:
    """--no_progress, TQDM_DISABLE=1, or a process of a torchrun job other than rank 0."""
    return bool(getattr(args, 'no_progress', False)) or os.environ.get('TQDM_DISABLE') == '1' or distributed.launched_rank() != 0
