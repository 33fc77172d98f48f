"""Fine-Pruning (FP; Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

Recipe as published: backdoor behaviour hides in neurons that stay dormant on clean inputs. Run the clean
data through the network, rank the channels of the last convolutional layer by their mean activation, prune
the least active ones in increasing order of activation until the clean validation accuracy drops (Liu et al.:
by 4 points), then fine-tune the pruned network on the clean data. BackdoorBench (`defense/fp.py`, config
`acc_ratio 0.1`, `once_prune_ratio 0.01`) prunes in steps of 1% of the channels and keeps the last network whose
clean accuracy is within 10% (relative) of the original's; it masks the input of the final linear layer, i.e. the
pooled feature, by the same ranking (the pooled channel's mean is the channel's mean activation).

Which channels are masked here, and why: the output channels of the encoder's last residual stage (`f.f.6`, ResNet
layer4), ranked by their mean activation over D (un-augmented, one eval-mode pass, over images and positions), as
both. The pooled feature f(x) is layer4's output averaged over positions, so a channel of one is a channel of the
other; but masking only the pooled feature needs a mask module, and every purified encoder must stay a plain SimCLR
state_dict. A channel of layer4's residual stream is written by the last BatchNorm of every block and by the
shortcut's BatchNorm: zeroing those BatchNorms' γ and β for the channel makes every block output relu(0 + 0) = 0
there, exactly, so the channel is 0 in layer4's output and in f(x), as BackdoorBench's mask makes it — and also in
the input of layer4's second block, which BackdoorBench's mask leaves alone (a stronger cut of the same channel).
The pruned γ, β are zeroed again after every optimiser step, so the channels stay pruned while the rest is
fine-tuned (`ft`'s recipe, SimCLR on D).

Label-free stopping rule (the part of "until the clean accuracy drops"): with no labels there is no accuracy, so
the measure is how much of the suspect's clean representation the pruned encoder keeps,
    agreement(k) = mean_{x ∈ D} cos(f_k(x), f_suspect(x)),
f_k the encoder with the k least active channels pruned, computed on un-augmented D (deterministic, so the rule
does not depend on an augmentation draw). Channels are pruned in steps of ⌈1% · C⌉ (`--fp_step`, BackdoorBench's)
while agreement(k) ≥ `--fp_min_cosine` (default 0.9: the representation may lose 10%, as BackdoorBench's accuracy
may); the first step that falls below stops the pruning and the last step above is kept (at least one channel
always stays). A dormant backdoor channel changes no clean feature, so it is pruned before the rule stops. The
former fixed fraction stays as an option: `--prune_ratio R` prunes the ⌊R·C⌋ least active channels.
"""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cli import same_on_resume
from core.errors import UsageError
from datasets import normalize_batch
from models import SimCLR

from .ft import finetune_phase, trainable_copy
from .training import DefenceRun

PAPER = 'Liu et al., Fine-Pruning, RAID 2018'
READS = "the suspect and D: its last stage's activations and features on D, then SimCLR views of D"
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
# why baseline_defence.py refuses it for a real-world encoder (docs/DESIGN.md §13)
CIFAR_ONLY = ("it prunes the CIFAR SimCLR's last stage through its layout (the Sequential f.f: layer4 at index 6, "
              'the pool at 7)')
TITLE = 'fp (Fine-Pruning)'  # of its argument group in baseline_defence.py's help
LAST_STAGE = 6  # index of ResNet layer4 in f.f (docs/DESIGN.md §3)
FP_SETTINGS = {'step': 0.01, 'min_cosine': 0.9}  # BackdoorBench's 1% steps; our bound on the agreement


@torch.no_grad()
def last_stage_inputs(model: SimCLR, images: np.ndarray, normalization, device: torch.device,
                      batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode pass over the un-augmented images: the input of the last residual stage (N, C3, H3, W3) (its
    pruned versions are run from there) and the stage's mean activation per output channel (C,), over images and
    positions. Every module's mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    inputs, total, count = [], None, 0
    for start in range(0, len(images), batch_size):
        x = normalize_batch(images[start:start + batch_size], normalization, device)
        _, taps = model.f.forward_with_taps(x)
        inputs.append(taps[-2])  # (B, C3, H3, W3): layer3's output
        last = taps[-1].float()  # (B, C, H, W), after the block's ReLU
        summed = last.sum(dim=(0, 2, 3)).double()  # (C,)
        total = summed if total is None else total + summed
        count += last.shape[0] * last.shape[2] * last.shape[3]
    for module, training in modes:
        module.training = training
    return torch.cat(inputs), (total / count).float()


def mean_channel_activation(model: SimCLR, images: np.ndarray, normalization, device: torch.device,
                            batch_size: int = 256) -> torch.Tensor:
    """Mean activation (C,) of each output channel of the last residual stage over the images and positions."""
    return last_stage_inputs(model, images, normalization, device, batch_size)[1]


def lowest_channels(activation: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (C,) of the `count` channels of lowest mean activation (ties: lower index first)."""
    order = torch.sort(activation, stable=True).indices
    mask = torch.zeros(activation.numel(), dtype=torch.bool, device=activation.device)
    mask[order[:count]] = True
    return mask


def least_active_channels(activation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (C,) of the ⌊ratio·C⌋ channels of lowest mean activation (ties: lower index first)."""
    return lowest_channels(activation, int(ratio * activation.numel()))


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


@torch.no_grad()
def pruned_features(model: SimCLR, stage_inputs: torch.Tensor, mask: torch.Tensor, batch_size: int = 256
                    ) -> torch.Tensor:
    """The features f (N, d) of `model` with the masked channels of its last stage pruned, run in eval mode from the
    cached stage inputs (N, C3, H3, W3) on a copy of the stage: `model` itself is not changed."""
    stage = copy.deepcopy(model.f.f[LAST_STAGE]).eval()
    prune_channels(stage, mask)
    pool = model.f.f[LAST_STAGE + 1]
    return torch.cat([torch.flatten(pool(stage(stage_inputs[start:start + batch_size])), 1).float()
                      for start in range(0, len(stage_inputs), batch_size)])


def agreement(pruned: torch.Tensor, reference: torch.Tensor) -> float:
    """mean_b cos(pruned_b, reference_b) of two feature sets (N, d)."""
    return F.cosine_similarity(pruned, reference, dim=1).mean().item()


def prune_until_agreement_drops(model: SimCLR, stage_inputs: torch.Tensor, activation: torch.Tensor, *,
                                step: float = FP_SETTINGS['step'], min_cosine: float = FP_SETTINGS['min_cosine'],
                                batch_size: int = 256) -> tuple[torch.Tensor, dict[int, float]]:
    """The label-free stopping rule (module docstring): prune the k = s, 2s, ... (s = ⌈step·C⌉, k < C) least active
    channels while agreement(k) ≥ min_cosine; returns the mask of the last k that kept it (none pruned if even
    the first step falls below) and {k: agreement(k)} for every k measured."""
    channels = activation.numel()
    stride = max(1, math.ceil(step * channels))
    reference = pruned_features(model, stage_inputs, lowest_channels(activation, 0), batch_size)  # the suspect's
    kept, curve = 0, {}
    for count in range(stride, channels, stride):
        features = pruned_features(model, stage_inputs, lowest_channels(activation, count), batch_size)
        curve[count] = agreement(features, reference)
        if curve[count] < min_cosine:
            break
        kept = count
    return lowest_channels(activation, kept), curve


def choose_mask(model: SimCLR, clean: np.ndarray, run: DefenceRun) -> dict:
    """The pruning mask of a run (by the stopping rule, or --prune_ratio) and the agreement curve behind it."""
    args = run.args
    stage_inputs, activation = last_stage_inputs(model, clean, run.normalization, run.device, args.batch_size)
    if args.prune_ratio is None:
        mask, curve = prune_until_agreement_drops(model, stage_inputs, activation, step=args.fp_step,
                                                  min_cosine=args.fp_min_cosine, batch_size=args.batch_size)
    else:
        mask = least_active_channels(activation, args.prune_ratio)
        reference = pruned_features(model, stage_inputs, lowest_channels(activation, 0), args.batch_size)
        curve = {int(mask.sum()): agreement(pruned_features(model, stage_inputs, mask, args.batch_size), reference)}
    return {'prune_mask': mask.cpu(), 'prune_agreement': curve}


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    args = run.args
    model = trainable_copy(suspect)
    stage = model.f.f[LAST_STAGE]
    chosen = run.once(('prune_mask', 'prune_agreement'), lambda: choose_mask(model, clean, run))  # resumed: kept
    mask, curve = chosen['prune_mask'], chosen['prune_agreement']
    prune_channels(stage, mask)
    pruned = torch.nonzero(mask).flatten().tolist()
    rule = f'--prune_ratio {args.prune_ratio}' if args.prune_ratio is not None else \
        f'agreement with the suspect >= {args.fp_min_cosine}'
    print(f'fp: pruned {len(pruned)} of {mask.numel()} channels of f.f.{LAST_STAGE} (ResNet layer4; {rule}: '
          f'{curve.get(len(pruned), float("nan")):.4f})')
    phase = finetune_phase(model, run, after_step=lambda: prune_channels(stage, mask),
                           checkpoint_extra={'prune_mask': mask, 'prune_agreement': curve})
    run.train(phase, clean, args.epochs)
    return model, {'epochs': args.epochs, 'stop': 'ratio' if args.prune_ratio is not None else 'agreement',
                   'prune_ratio': args.prune_ratio, 'min_cosine': args.fp_min_cosine, 'step': args.fp_step,
                   'agreement': {str(count): round(value, 6) for count, value in curve.items()},
                   'pruned': {f'f.f.{LAST_STAGE}': pruned}, 'channels_pruned': len(pruned),
                   'channels_total': mask.numel()}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    same_on_resume(group.add_argument(
        '--fp_min_cosine', default=FP_SETTINGS['min_cosine'], type=float,
        help="stopping rule: prune while the pruned encoder's features keep a mean cosine of at least this with the "
             "suspect's on D (default: 0.9, the label-free stand-in for 'until the clean accuracy drops')"))
    same_on_resume(group.add_argument(
        '--fp_step', default=FP_SETTINGS['step'], type=float,
        help="fraction of layer4's channels pruned per step of the stopping rule (default: 0.01, BackdoorBench's)"))
    same_on_resume(group.add_argument(
        '--prune_ratio', default=None, type=float,
        help="instead of the stopping rule, prune this fixed fraction of layer4's channels, least active on D first, "
             'in [0, 1) (default: unset, the stopping rule)'))


def check(args: argparse.Namespace) -> None:
    if args.prune_ratio is not None and not 0 <= args.prune_ratio < 1:
        raise UsageError(f'--prune_ratio must lie in [0, 1), got {args.prune_ratio}')
    if not 0 < args.fp_step < 1:
        raise UsageError(f'--fp_step must lie in (0, 1), got {args.fp_step}')
    if not -1 <= args.fp_min_cosine <= 1:
        raise UsageError(f'--fp_min_cosine must lie in [-1, 1], got {args.fp_min_cosine}')
