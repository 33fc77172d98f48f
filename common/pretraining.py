"""Stage 0, SimCLR pre-training (`train_clean_encoder.py`, docs/DESIGN.md §4): its command line and its epoch, which
the stage script and the throughput benchmark (scripts/benchmark.py) share.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from core.cli import SameOnResume, StageParser
from datasets import pretraining_names
from datasets.fastpath import add_speed_arguments
from datasets.tensor_augment import CROP_SCALE
from models import ARCHITECTURES, PAPER_WIDTH, SimCLR

from . import distributed
from .cli import shared_parser
from .engine import nt_xent_step, train_steps

ADAM_WEIGHT_DECAY = 1e-6  # the paper's (docs/DESIGN.md §4.3), the default of --weight_decay


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='Train a clean SimCLR encoder (stage 0 of the pipeline).',
                         parents=[shared_parser()])
    same = SameOnResume(parser)  # the flags that shape the run: --resume refuses other values
    same.add_argument('--lr', default=0.001, type=float,
                      help='learning rate (after any warm-up; the peak of a cosine schedule) (default: 0.001)')
    same.add_argument('--batch_size', default=256, type=int, help='images per batch (default: 256)')
    parser.add_argument('--epochs', default=1000, type=int, help='number of training epochs (default: 1000)')
    same.add_argument('--pretraining_dataset', default='cifar10', type=str, choices=pretraining_names(),
                      help='dataset to pre-train on (default: cifar10)')
    same.add_argument('--suffix_encoder', default='', type=str, metavar='PATH',
                      help='start from this encoder checkpoint; its architecture and width win '
                           '(default: random initialisation)')
    same.add_argument('--knn-t', default=0.5, type=float,
                      help='temperature of the kNN monitor and of the NT-Xent loss (default: 0.5)')
    parser.add_argument('--knn-k', default=200, type=int, help='neighbours of the kNN monitor (default: 200)')
    parser.add_argument('--arch', default='resnet18', type=str, choices=sorted(ARCHITECTURES),
                        help='encoder architecture (default: resnet18)')
    parser.add_argument('--width', default=PAPER_WIDTH, type=int,
                        help=f'base channels of the ResNet ({PAPER_WIDTH} = the paper; smaller for fast CPU runs)')
    parser.add_argument('--save_freq', default=0, type=int,
                        help='also save model_<epoch>.pth every this many epochs (default: 0, only at the end)')
    recipe = SameOnResume(parser.add_argument_group(
        'optimiser, schedule and crop (defaults: the paper\'s Adam recipe; CTRL\'s: sgd, --lr 0.06, --weight_decay '
        '5e-4, cosine, 10 warm-up epochs, --crop_min_scale 0.2)'))
    recipe.add_argument('--optimizer', default='adam', choices=('adam', 'sgd'), help='optimiser (default: adam)')
    recipe.add_argument('--momentum', default=0.9, type=float, help='momentum of sgd (default: 0.9; adam ignores it)')
    recipe.add_argument('--weight_decay', default=ADAM_WEIGHT_DECAY, type=float,
                        help=f'weight decay (default: {ADAM_WEIGHT_DECAY:g})')
    recipe.add_argument('--schedule', default='constant', choices=('constant', 'cosine'),
                        help='learning rate per epoch after the warm-up (default: constant)')
    recipe.add_argument('--warmup_epochs', default=0, type=int,
                        help='epochs of linear learning-rate warm-up (default: 0)')
    recipe.add_argument('--crop_min_scale', default=CROP_SCALE[0], type=float,
                        help='smallest area fraction of the SimCLR views\' random resized crop (default: '
                             f'{CROP_SCALE[0]:g}, torchvision\'s and the paper\'s; CTRL\'s code: 0.2)')
    recipe.add_argument('--no_normalize', action='store_true',
                        help="train on un-normalised pixels in [0, 1], as CTRL's code does by default (its "
                             '--disable_normalize); the checkpoints record it (raw_inputs) and every later stage '
                             'feeds the encoder such pixels (default: normalised with the set\'s mean and std)')
    add_speed_arguments(parser)
    distributed.add_distributed_arguments(parser)
    return parser


def train_one_epoch(model: SimCLR, loader: DataLoader, optimizer: torch.optim.Optimizer, temperature: float,
                    epoch: int, device: torch.device, use_amp: bool, disable_progress: bool) -> float:
    """One pass of SimCLR over the loader (one forward per view, `common.engine.nt_xent_step`); returns the mean
    NT-Xent loss per image.

    Under torchrun `model` is the DistributedDataParallel wrapper, the loader yields this process's share of each
    global batch and the NT-Xent takes its negatives from the global batch (`common.distributed.nt_xent`); the
    loss checked and returned is the global batch's.
    """
    model.train()
    return train_steps(loader, optimizer, nt_xent_step(model, temperature, device, use_amp), epoch=epoch,
                       device=device, per_image=True, desc=f'Train epoch {epoch}',
                       disable_progress=disable_progress)['loss']
