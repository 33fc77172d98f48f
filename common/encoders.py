"""The one way a stage loads an encoder it is given (docs/DESIGN.md §3.1): stage 1's clean encoder, stage 2's
suspect, stage 3's encoder under evaluation.

`models.load_any_encoder` reads the file safely: a CIFAR SimCLR of ours (its architecture off the checkpoint), or a
real-world encoder of the family --encoder_usage_info CLIP|imagenet or --arch names, else of the family its keys
show. A real-world encoder brings its own normalisation; a SimCLR of ours records the set it was pre-trained on,
and when the stage is told another set, one warning says so.
"""
from __future__ import annotations

import argparse
import sys

import torch

from datasets import pretraining_names
from models import ARCHITECTURES, VisualEncoder, load_any_encoder

from .cli import encoder_family


def recorded_pretraining_set(checkpoint: dict) -> str | None:
    """The pre-training set a checkpoint's run recorded (its --encoder_usage_info, else its --pretraining_dataset,
    whichever names a pre-training set first), or None."""
    run_args = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    return next((run_args[key] for key in ('encoder_usage_info', 'pretraining_dataset')
                 if run_args.get(key) in pretraining_names()), None)


def load_encoder(path: str, args: argparse.Namespace, flag: str, given: str | None) -> tuple[torch.nn.Module, dict]:
    """(the encoder at `path`, its checkpoint), its family from --encoder_usage_info/--arch (`args`), else the file;
    for a real-world encoder args.arch is set to its family (args.json and the checkpoints name it). For a SimCLR
    whose recorded pre-training set is not `given`, the set the stage's `flag` names, one warning on stderr: the
    encoder's inputs are normalised as `given`."""
    encoder, checkpoint = load_any_encoder(path, encoder_family(args),
                                           args.arch if args.arch in ARCHITECTURES else None)
    if isinstance(encoder, VisualEncoder):
        args.arch = encoder.family
        return encoder, checkpoint
    recorded = recorded_pretraining_set(checkpoint)
    if given and recorded and recorded != given:
        print(f"warning: {path} records the pre-training set '{recorded}', but {flag} is '{given}': its inputs are "
              f"normalised as '{given}'", file=sys.stderr)
    return encoder, checkpoint
