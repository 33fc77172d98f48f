"""Stage 2's one driver (docs/DESIGN.md §6, §13): the flags every defence shares, their checks, and the run —
load the suspect and the clean subset D, `purify(suspect, clean, run)`, save, report. `MIMIC.py` (MIMIC) and
`baseline_defence.py` (the eight baselines) are its two command lines; a defence is a module of `defences/` with
`purify`, `PAPER`, `READS`, `READS_IMAGES`, `TRAINS`, `CHECKPOINT` and, where it has them, `add_arguments` and
`check` for its own flags and `CIFAR_ONLY` for what a real-world encoder cannot take.

Writes to --results_dir: args.json, what the defence writes while it runs (log.csv, checkpoints, mi.json, ...),
the purified encoder (epoch --epochs, or epoch 0 for a defence that trains no weight) and, last, defence.json:
what the defence did and its wall-clock seconds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import distributed
from common.cli import (add_arch_argument, check_save_freq, data_dir_for, print_args, require_positive,
                        seed_everything)
from common.encoders import load_encoder
from common.runs import check_layout_resumable, prepare_results_dir, write_args, write_json
from core import processes
from core.cli import SameOnResume, resume_flags
from core.errors import UsageError
from datasets import get_info, load_images, pretraining_names
from datasets.fastpath import to_channels_last
from models import USAGE_INFO_FAMILIES, Layout, VisualEncoder, encoder_input_size, encoder_normalization

from .training import DefenceRun

OUTPUTS = ('defence.json',)  # written last: a finished run
SHARED_FLAGS = ('--teacher', '--encoder_usage_info', '--arch', '--pretraining_dataset', '--ratio', '--subset',
                '--epochs', '--batch_size', '--lr', '--knn-t', '--save_freq')


def clean_subset(images: np.ndarray, ratio: float, subset: str, seed: int, batch_size: int,
                 source: str) -> np.ndarray:
    """D: the first ⌊ratio·N⌋ images (the original), or as many drawn at random with `seed`; at least one batch
    of them (docs/DESIGN.md §6)."""
    count = int(ratio * len(images))
    if count < batch_size:
        raise UsageError(f'--ratio {ratio} gives {count} of the {len(images)} images of {source}, fewer '
                         f'than one batch of {batch_size}; raise --ratio or lower --batch_size')
    return select_images(images, count, subset, seed)


def select_images(images: np.ndarray, count: int, subset: str, seed: int) -> np.ndarray:
    """The first `count` images (subset `first`), or `count` drawn without replacement with `seed`, in file order."""
    if subset == 'first':
        return images[:count]
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(images), generator=generator)[:count].sort().values.numpy()
    return images[indices]


def load_clean_subset(args, image_size: int | None = None) -> tuple:
    """(the pre-training set's DatasetInfo, D): --ratio/--subset of its pre-training split under --data_dir or
    --data_root (npz files, or an image folder), the clean subset MIMIC.py and every baseline defence take; at
    `image_size` when given (a real-world encoder's input: D alone is resized, docs/DESIGN.md §2.6)."""
    info = get_info(args.pretraining_dataset)
    data_dir = data_dir_for(args, info.name)
    images = load_images(info.name, info.pretraining_split, data_dir, image_size)
    return info, clean_subset(images, args.ratio, args.subset, args.seed, args.batch_size,
                              f'{info.name}/{info.pretraining_split}')


def load_suspect(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Layout | None]:
    """(the suspect encoder --teacher, loaded safely (`common.encoders.load_encoder`), in eval mode and frozen, and
    for a real-world encoder the `Layout` of its file, in which its purified copies are written; None for a CIFAR
    SimCLR). A bare or openai file holds tensors only, so the checkpoints written in its layout carry no run state:
    --resume is refused for it."""
    suspect, checkpoint = load_encoder(args.teacher, args, '--pretraining_dataset', args.pretraining_dataset)
    layout = checkpoint.get('layout') if isinstance(suspect, VisualEncoder) else None
    check_layout_resumable(layout, args.teacher, args.resume, 'purified')
    suspect.eval().requires_grad_(False)
    return to_channels_last(suspect.to(device), device), layout


def add_defence_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] = SHARED_FLAGS,
                          **custom: dict) -> None:
    """The flags every defence shares (SHARED_FLAGS), each with its default and help, or those of them `names`
    lists, in that order (--arch comes with --encoder_usage_info); `custom` replaces the keyword arguments of a
    flag (keyed by its name without dashes, e.g. lr={'default': 0.001, 'help': ...}), for a command line whose
    defaults or order differ (MIMIC.py keeps the original's)."""
    same = SameOnResume(parser)  # the flags that shape the run: --resume refuses other values
    flags = {
        'teacher': dict(default='', type=str, metavar='PATH',
                        help='the suspect (backdoored) encoder checkpoint (required)'),
        'encoder_usage_info': dict(default='', choices=('', *USAGE_INFO_FAMILIES),
                                   help="a real-world suspect, as the released code names it: CLIP (CLIP's RN50 image "
                                        "encoder) or imagenet (the ImageNet SimCLR ResNet-50); its normalisation and "
                                        "224-px input replace --pretraining_dataset's (default: read off the file)"),
        'pretraining_dataset': dict(default='cifar10', type=str, choices=pretraining_names(),
                                    help="the suspect's pre-training set: D comes from its pre-training split, and it "
                                         'fixes the normalisation (default: cifar10)'),
        'ratio': dict(default=0.04, type=float,
                      help='fraction of the pre-training split used as the clean subset D, in (0, 1] (default: 0.04)'),
        'subset': dict(default='first', choices=['first', 'random'],
                       help='first: the first ratio*N images, as the original; random: drawn with --seed '
                            '(default: first)'),
        'epochs': dict(default=1000, type=int, help='training epochs over D (default: 1000)'),
        'batch_size': dict(default=128, type=int, help='images per step (default: 128)'),
        'lr': dict(default=0.001, type=float, help='Adam learning rate of the trained network (default: 0.001)'),
        'knn-t': dict(default=0.5, type=float,
                      help='temperature of the NT-Xent loss, named as in the original (default: 0.5)'),
        'save_freq': dict(default=0, type=int,
                          help='also save a checkpoint every this many epochs (default: 0, only at the end)'),
    }
    for flag in names:
        name = flag.lstrip('-')
        if name == 'arch':
            continue  # added with --encoder_usage_info
        options = {**flags[name], **custom.get(name.replace('-', '_'), {})}
        if name == 'encoder_usage_info':
            same.add_argument(f'--{name}', **options)
            add_arch_argument(parser)
        elif name in ('epochs', 'save_freq'):  # a resumed run may be lengthened, or saved more often
            parser.add_argument(f'--{name}', **options)
        else:
            same.add_argument(f'--{name}', **options)


def check_args(args: argparse.Namespace, defences: list) -> None:
    """Flag values that cannot work, refused before anything is loaded or written (docs/DESIGN.md §11): the shared
    flags, then each defence module's own (`check`)."""
    if not args.teacher:
        raise UsageError('--teacher is required: the suspect encoder checkpoint to purify')
    if not args.results_dir:
        raise UsageError('--results_dir is required: the folder where the purified encoder and logs are written')
    if not 0 < args.ratio <= 1:
        raise UsageError(f'--ratio must lie in (0, 1], got {args.ratio}')
    require_positive('--epochs', args.epochs)
    if args.batch_size < 2:
        raise UsageError(f'--batch_size must be at least 2 (contrastive loss, BatchNorm), got {args.batch_size}')
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f'--lr must be positive, got {args.lr}')
    check_save_freq(args.save_freq)
    for module in defences:
        if hasattr(module, 'check'):
            module.check(args)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, defence) -> None:
    """Purify --teacher with `defence` (the module of defence `name`) on the clean subset D; every input is checked
    before anything is written, and under torchrun a defence that trains no weight runs in rank 0 alone."""
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group

    # The suspect, frozen (with, for a real-world encoder, its file's layout), and D of its pre-training split, at
    # its input size; none for a data-free defence (clp), which reads no image and so checks no data size.
    suspect, layout = load_suspect(args, device)
    if layout is not None and getattr(defence, 'CIFAR_ONLY', None):
        raise UsageError(f'--defence {name} supports only the CIFAR-style SimCLR: {defence.CIFAR_ONLY}; '
                         f'{args.teacher} is a {suspect.family} encoder')
    info, clean = load_clean_subset(args, encoder_input_size(suspect)) if defence.READS_IMAGES \
        else (get_info(args.pretraining_dataset), None)
    if not defence.TRAINS and not processes.is_main():
        return  # clp and anp train no weight: under torchrun rank 0 runs them alone

    prepare_results_dir(args, defence.CHECKPOINTS, OUTPUTS)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_args(results_dir, args)
    if clean is None:
        data = 'data-free, no image read'
    else:
        source = f'{info.name}/{info.pretraining_split}' if layout is None else \
            f'{args.data_dir or info.name} at {clean.shape[1]} px'
        data = f'{len(clean)} clean images of {source} ({args.subset})'
    print(f'{name} ({defence.PAPER}): {data}; suspect {suspect.config}'
          f'{f" ({layout.format} layout)" if layout else ""} on {device}')

    start = time.perf_counter()
    run = DefenceRun(args, encoder_normalization(suspect, info.normalization), device, results_dir,
                     resume_flags(parser), layout)
    purified, report = defence.purify(suspect, clean, run)
    checkpoint = results_dir / defence.CHECKPOINTS[0].format(args.epochs if defence.TRAINS else 0)
    if not defence.TRAINS:  # a defence that trains saved its last epoch already
        run.save(purified, checkpoint, defence=name)
    write_json(results_dir / 'defence.json', {
        'defence': name, 'paper': defence.PAPER, 'checkpoint': checkpoint.name,
        'images': 0 if clean is None else len(clean),
        'seconds': round(time.perf_counter() - start, 2), 'resumed': bool(args.resume), **report})
    print(f'purified encoder: {checkpoint}')
