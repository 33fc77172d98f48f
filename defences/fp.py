"""Fine-Pruning (FP; Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

Recipe as published: backdoor behaviour hides in neurons that stay dormant on clean inputs. Run the clean
data through the network, rank the channels of the last convolutional layer by their mean activation, prune
the least active ones (in increasing order of activation, until the clean validation accuracy drops by a set
margin), then fine-tune the pruned network on the clean data.
Label-free adaptation: with no labels there is no validation accuracy to stop on, so a fixed fraction
`--prune_ratio` (default 0.2) of the channels is pruned. The "last convolutional layer" of a ResNet encoder
is its last residual stage (`f.f.6`, ResNet layer4): its output channels are ranked by their mean activation
over D (un-augmented, one eval-mode pass, over images and positions). Fine-tuning is `ft`'s (SimCLR on D).
Pruning in a plain state_dict: a channel of the residual stream is written by the last BatchNorm of every
block and by the shortcut's BatchNorm; zeroing those BatchNorms' γ and β for the channel makes every block
output relu(0 + 0) = 0 there, exactly. The pruned γ, β are zeroed again after every optimiser step, so the
channels stay pruned while the rest is fine-tuned.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn

from common.errors import UsageError
from datasets import normalize_batch
from models import SimCLR

from .ft import finetune_phase, trainable_copy
from .training import DefenceRun

PAPER = 'Liu et al., Fine-Pruning, RAID 2018'
READS = "the suspect and D: its last stage's activations on D, then SimCLR views of D"
READS_IMAGES = True  # whether baseline_defence.py loads D for it
TITLE = 'fp (Fine-Pruning)'  # of its argument group in baseline_defence.py's help
LAST_STAGE = 6  # index of ResNet layer4 in f.f (docs/DESIGN.md §3)


@torch.no_grad()
def mean_channel_activation(model: SimCLR, images: np.ndarray, normalization, device: torch.device,
                            batch_size: int = 256) -> torch.Tensor:
    """Mean activation (C,) of each output channel of the last residual stage over the images and positions.

    One eval-mode pass (the tapped output of f.f.6 comes from the same forward that computes the feature);
    every module's mode is restored afterwards.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total, count = None, 0
    for start in range(0, len(images), batch_size):
        x = normalize_batch(images[start:start + batch_size], normalization, device)
        _, taps = model.f.forward_with_taps(x)
        last = taps[-1].float()  # (B, C, H, W), after the block's ReLU
        summed = last.sum(dim=(0, 2, 3)).double()  # (C,)
        total = summed if total is None else total + summed
        count += last.shape[0] * last.shape[2] * last.shape[3]
    for module, training in modes:
        module.training = training
    return (total / count).float()


def least_active_channels(activation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (C,) of the ⌊ratio·C⌋ channels of lowest mean activation (ties: lower index first)."""
    count = int(ratio * activation.numel())
    order = torch.sort(activation, stable=True).indices
    mask = torch.zeros(activation.numel(), dtype=torch.bool, device=activation.device)
    mask[order[:count]] = True
    return mask


def residual_stream_batchnorms(stage: nn.Sequential) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BN) of every BatchNorm that writes into the stage's output channels: the last BN of each block
    (bn2 of a BasicBlock, bn3 of a Bottleneck) and the shortcut's BN (downsample.1) where there is one."""
    found = []
    for block_name, block in stage.named_children():
        last = 'bn3' if hasattr(block, 'bn3') else 'bn2'
        found.append((f'{block_name}.{last}', getattr(block, last)))
        if block.downsample is not None:
            found.append((f'{block_name}.downsample.1', block.downsample[1]))
    return found


@torch.no_grad()
def prune_channels(stage: nn.Sequential, mask: torch.Tensor) -> None:
    """Zero γ and β of the masked channels in every BN of the stage's residual stream (in place): the stage's
    output is then exactly 0 on those channels, whatever the input."""
    for _, bn in residual_stream_batchnorms(stage):
        bn.weight[mask.to(bn.weight.device)] = 0
        bn.bias[mask.to(bn.bias.device)] = 0


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    args = run.args
    model = trainable_copy(suspect)
    stage = model.f.f[LAST_STAGE]
    mask = run.once('prune_mask', lambda: least_active_channels(  # a resumed run keeps its mask
        mean_channel_activation(model, clean, run.normalization, run.device, args.batch_size), args.prune_ratio).cpu())
    prune_channels(stage, mask)
    pruned = torch.nonzero(mask).flatten().tolist()
    print(f'fp: pruned {len(pruned)} of {mask.numel()} channels of f.f.{LAST_STAGE} (ResNet layer4)')
    phase = finetune_phase(model, run, after_step=lambda: prune_channels(stage, mask),
                           checkpoint_extra={'prune_mask': mask})
    run.train(phase, clean, args.epochs)
    return model, {'epochs': args.epochs, 'prune_ratio': args.prune_ratio,
                   'pruned': {f'f.f.{LAST_STAGE}': pruned}, 'channels_pruned': len(pruned),
                   'channels_total': mask.numel()}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--prune_ratio', default=0.2, type=float,
                       help="fraction of the last stage's channels pruned, least active on D first, in [0, 1) "
                            '(default: 0.2; the paper prunes until the accuracy drops, which needs labels)')


def check(args: argparse.Namespace) -> None:
    if not 0 <= args.prune_ratio < 1:
        raise UsageError(f'--prune_ratio must lie in [0, 1), got {args.prune_ratio}')
