"""Stage 1's command line (`train_badencoder.py`, docs/DESIGN.md §5, §12): its flags, and the attacks `--attack`
chooses from, each behind the attack interface of attacks/badencoder.py. The stage script and the throughput
benchmark (scripts/benchmark.py) share them.
"""
from __future__ import annotations

import argparse

from common import distributed
from common.cli import add_arch_argument, shared_parser
from core.cli import SameOnResume, StageParser
from datasets import DATASETS, pretraining_names
from datasets.fastpath import add_speed_arguments
from models import USAGE_INFO_FAMILIES

from . import drupe
from .badencoder import SHADOW_SIZE, BadEncoder

ATTACKS = {'badencoder': BadEncoder, 'drupe': drupe.Drupe}  # the attack interface: attacks/badencoder.py


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='Plant a BadEncoder backdoor in a pre-trained SimCLR encoder (stage 1).',
                         parents=[shared_parser()])
    same = SameOnResume(parser)  # the flags that shape the run: --resume refuses other values
    same.add_argument('--batch_size', default=256, type=int, help='shadow images per step (default: 256)')
    same.add_argument('--lr', default=0.001, type=float, help='SGD learning rate (default: 0.001)')
    same.add_argument('--lambda1', default=1.0, type=float,
                      help='weight of L1, the reference-stays-put loss (default: 1.0)')
    same.add_argument('--lambda2', default=1.0, type=float,
                      help='weight of L2, the clean-features-stay-put loss (default: 1.0)')
    parser.add_argument('--epochs', default=200, type=int, help='passes over the shadow set (default: 200)')
    same.add_argument('--reference_file', default='', type=str, metavar='PATH',
                      help='npz with the reference inputs x and their target labels y; y[0] is the target')
    same.add_argument('--trigger_file', default='', type=str, metavar='PATH',
                      help='npz with the trigger patches t and masks tm')
    parser.add_argument('--pretraining_dataset', default='cifar10', choices=pretraining_names(),
                        help='the set the clean encoder was pre-trained on; recorded in args.json only, the '
                             'normalisation comes from --encoder_usage_info (default: cifar10)')
    same.add_argument('--shadow_dataset', default='cifar10', choices=sorted(DATASETS),
                      help="the attacker's shadow data: that set's pre-training split, at most "
                           f'{SHADOW_SIZE} images (default: cifar10)')
    parser.add_argument('--downstreamTask', default='cifar10', choices=sorted(DATASETS),
                        help="the target downstream task: the reference labels must be among its classes; "
                             'when prepared, its kNN accuracy and attack success are monitored (default: cifar10)')
    same.add_argument('--pretrained_encoder', default='', type=str, metavar='PATH',
                      help='the clean encoder checkpoint to backdoor (loaded with weights_only=True)')
    same.add_argument('--encoder_usage_info', default='cifar10', choices=(*pretraining_names(), *USAGE_INFO_FAMILIES),
                      help="the encoder's pre-training set, which fixes the normalisation (default: cifar10); or, as "
                           f"the released code, {' or '.join(USAGE_INFO_FAMILIES)}: CLIP's RN50 image encoder or the "
                           'ImageNet SimCLR ResNet-50, with their own normalisation and 224-px input (shadow set '
                           'cifar10_224, a 224-px trigger)')
    add_arch_argument(parser)
    parser.add_argument('--knn-k', dest='knn_k', default=200, type=int,
                        help='neighbours of the kNN monitor (default: 200)')
    parser.add_argument('--knn-t', dest='knn_t', default=0.5, type=float,
                        help='temperature of the kNN monitor (default: 0.5)')
    parser.add_argument('--save_freq', default=20, type=int,
                        help='write model_<epoch>.pth every this many epochs, and at the end '
                             '(0: only at the end) (default: 20)')
    same.add_argument('--attack', default='badencoder', choices=tuple(ATTACKS),
                      help='badencoder (Jia et al., S&P 2022), or drupe (Tao et al., S&P 2024: attacks/drupe.py), '
                           "whose values fill every flag not given (default: badencoder)")
    same.add_argument('--shadow_fraction', default=1.0, type=float,
                      help='use this fraction of the shadow set, a fixed random subset '
                           f"(default: 1.0; DRUPE: {drupe.RECIPE['shadow_fraction']})")
    same.add_argument('--num_references', default=None, type=int, metavar='N',
                      help='use the first N references of --reference_file '
                           f"(default: all of them; DRUPE: {drupe.RECIPE['num_references']})")
    drupe.add_arguments(parser.add_argument_group(drupe.TITLE))
    add_speed_arguments(parser)
    distributed.add_distributed_arguments(parser)
    return parser
