"""The command line of `baseline_defence.py` (stage 2's baselines, docs/DESIGN.md §13): its flags, each defence's
own among them, and the default learning rate of each defence. The stage script and the throughput benchmark
(scripts/benchmark.py) share them.
"""
from __future__ import annotations

import argparse

from common import distributed
from common.cli import shared_parser
from core.cli import SameOnResume, StageParser
from datasets.fastpath import add_speed_arguments

from . import BASELINES, get_defence
from .stage import add_defence_arguments

# kd: a fresh student, as MIMIC's README; sslcleanse: SSL-Cleanse's README; the others fine-tune: 1e-3
DEFAULT_LR = {'kd': 1e-2, 'sslcleanse': 3e-3}


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='Purify a suspect encoder with a baseline defence (stage 2, beside MIMIC.py).',
                         parents=[shared_parser()])
    same = SameOnResume(parser)  # the flags that shape the run: --resume refuses other values
    same.add_argument('--defence', required=True, choices=BASELINES, metavar='{' + ','.join(BASELINES) + '}',
                      help='the defence, and what it reads: ' + '; '.join(
                          f'{name}: {get_defence(name).READS}' for name in BASELINES)
                      + ' (each module of defences/ gives its paper and recipe)')
    add_defence_arguments(
        parser,
        teacher={'help': 'the suspect (backdoored) encoder checkpoint (required; the flag MIMIC.py uses)'},
        encoder_usage_info={'help': "a real-world suspect, as the released code names it: CLIP (CLIP's RN50 image "
                                    "encoder) or imagenet (the ImageNet SimCLR ResNet-50); its normalisation and 224-px "
                                    "input replace --pretraining_dataset's; fp and anp refuse such encoders (default: "
                                    'read off the file)'},
        ratio={'help': 'fraction of the pre-training split used as the clean subset D, in (0, 1] '
                       '(default: 0.04, as MIMIC)'},
        subset={'help': 'first: the first ratio*N images, as MIMIC.py; random: drawn with --seed (default: first)'},
        epochs={'help': 'training epochs over D for ft, fp, nad, kd, invert, sslcleanse; accepted and unused by '
                        "clp and anp (default: 1000, MIMIC's budget)"},
        batch_size={'help': 'images per step of the defences that use D (default: 128, as MIMIC)'},
        lr={'default': None, 'help': "Adam learning rate of the trained network (default: 1e-3 for the defences that "
                                     "fine-tune the suspect, stage 0's rate; 1e-2 for kd's fresh student, as MIMIC; "
                                     "3e-3 for sslcleanse, SSL-Cleanse's)"},
        knn_t={'help': 'temperature of the NT-Xent loss, as MIMIC.py (default: 0.5)'},
        save_freq={'help': 'also save model_<epoch>.pth every this many epochs (default: 0, only at the end)'})
    for name in BASELINES:  # each defence's own flags, defined and checked in its module
        module = get_defence(name)
        if hasattr(module, 'add_arguments'):
            module.add_arguments(parser.add_argument_group(module.TITLE, f'reads {module.READS}'))
    add_speed_arguments(parser)
    distributed.add_distributed_arguments(parser)
    return parser
