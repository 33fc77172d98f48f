"""Channel Lipschitzness-based Pruning (CLP; Zheng, Tang, Li and Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022), applied to the feature network `f` of a suspect SimCLR encoder.

The recipe as published (paper §3-4 and its code, github.com/rkteddy/channel-Lipschitzness-based-pruning,
`defense.py` and `test.py`):
- every BatchNorm2d is paired with the convolution before it (the code walks `net.named_modules()` and
  remembers the last Conv2d it met);
- the upper bound of channel k's Lipschitz constant (UCLC) is the largest singular value of the conv kernel
  W_k (C_in, k, k) reshaped to (C_in, k·k), times |γ_k| / σ_k with σ_k = sqrt(running_var_k) — the code
  takes the square root of the running variance alone, without BatchNorm's eps, and so do we by default;
- within each layer, channels whose bound exceeds mean + u·std of the layer's bounds are pruned, with
  `Tensor.std()`'s sample (n − 1) standard deviation; u = 3 by default (`test.py -u 3.`);
- pruning zeroes the BatchNorm weight *and* bias of the flagged channels, in place; no data is used.

Adaptation to the encoder setting: none is needed — CLP is data-free and label-free, so it reads the suspect
encoder's weights exactly as it reads a classifier's. The projection head `g` is left untouched (it is not
part of the encoder that downstream tasks use, and its BatchNorm1d follows a Linear layer, not a conv), and
BatchNorm2d layers not directly preceded by a Conv2d are skipped rather than paired with an earlier conv
(ResNets have none, so for the encoders of this project the two rules agree).

A property of the threshold worth knowing: with the sample std, no value of a layer of n channels can lie
more than (n − 1)/√n standard deviations above the mean (one channel at x, the other n − 1 equal: z = (n − 1)/√n),
so at u = 3 a layer needs at least 11 channels before any of its channels can be pruned: at width 8 (the demo's)
the stem and layer1 (8 channels, bound 2.47) never can, layer2 (16, bound 3.75) can. `defence.json` records
every layer's largest z-score (`max_z`), so a run that prunes nothing says how far from the threshold it was;
`--clp_u` sweeps the threshold as a diagnostic (CLP's own value is 3).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

from core.errors import UsageError
from models import SimCLR, VisualEncoder


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(conv name, conv, bn name, bn) for every Conv2d whose next leaf module, in registration order, is a
    BatchNorm2d over its output channels. Names are relative to `module` (as `named_modules` gives them)."""
    pairs, previous = [], None
    for name, child in module.named_modules():
        if next(child.children(), None) is not None:
            continue  # a container: the walk is over leaf modules, in the order they were registered
        if isinstance(child, nn.BatchNorm2d) and previous is not None and isinstance(previous[1], nn.Conv2d) \
                and previous[1].out_channels == child.num_features:
            pairs.append((previous[0], previous[1], name, child))
        previous = (name, child)
    return pairs


def channel_lipschitz_bounds(conv_weight: torch.Tensor, bn_weight: torch.Tensor, bn_running_var: torch.Tensor,
                             eps: float = 0.0) -> torch.Tensor:
    """UCLC_k = σ_max(W_k reshaped to (C_in, k·k)) · |γ_k| / sqrt(var_k + eps), for each output channel k.

    conv_weight (C_out, C_in, kh, kw), bn_weight γ (C_out,), bn_running_var (C_out,) -> (C_out,).
    eps = 0 is CLP's code (σ = sqrt(running_var)); BatchNorm's own eps gives the exact bound of the layer.
    """
    kernels = conv_weight.reshape(conv_weight.shape[0], conv_weight.shape[1], -1)  # (C_out, C_in, kh·kw)
    spectral = torch.linalg.matrix_norm(kernels, ord=2)  # (C_out,) largest singular value of each W_k
    return spectral * bn_weight.abs() / torch.sqrt(bn_running_var + eps)


def clp_prune_mask(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """bool (C,): bounds > mean(bounds) + u · std(bounds), with the sample (n − 1) std as CLP's code."""
    return bounds > bounds.mean() + u * bounds.std()


def max_z_score(bounds: torch.Tensor) -> float:
    """max_k (bound_k − mean) / std over a layer's bounds (C,), sample std: CLP prunes the layer iff this > u.

    At most (C − 1)/√C; 0 for a layer whose bounds are all equal (std 0: nothing stands out).
    """
    std = bounds.std()
    return 0.0 if not std > 0 else ((bounds.max() - bounds.mean()) / std).item()


def largest_possible_z(channels: int) -> float:
    """(n − 1)/√n: the largest z-score, sample std, any value of a layer of n channels can have."""
    return (channels - 1) / channels ** 0.5


@torch.no_grad()
def clp(model: SimCLR, u: float = 3.0) -> dict:
    """Prune, in place, every channel of `model.f` that CLP flags: its BatchNorm weight and bias become 0.

    Returns {'u', 'pruned': {bn name in the SimCLR state_dict, e.g. 'f.f.3.0.bn1': [channels]},
    'channels_pruned', 'channels_total', 'max_z': {bn name: the layer's largest z-score}}; layers with nothing
    pruned are left out of 'pruned', every paired layer is in 'max_z'.
    """
    pruned, total, max_z = {}, 0, {}
    prefix = 'visual.' if isinstance(model, VisualEncoder) else 'f.'  # the tower's name in the model's state_dict
    for _, conv, bn_name, bn in conv_bn_pairs(model.f):
        bounds = channel_lipschitz_bounds(conv.weight.float(), bn.weight.float(), bn.running_var.float())
        max_z[f'{prefix}{bn_name}'] = round(max_z_score(bounds), 4)
        flagged = torch.nonzero(clp_prune_mask(bounds, u)).flatten()  # (n_flagged,)
        bn.weight[flagged] = 0
        bn.bias[flagged] = 0
        total += bn.num_features
        if len(flagged):
            pruned[f'{prefix}{bn_name}'] = flagged.tolist()
    return {'u': u, 'pruned': pruned, 'channels_pruned': sum(map(len, pruned.values())), 'channels_total': total,
            'max_z': max_z}


PAPER = 'Zheng et al., Channel Lipschitzness-based Pruning, ECCV 2022'
READS = "the suspect's weights alone (data-free: no image is read, --ratio and --batch_size are unused)"
READS_IMAGES = False  # whether the stage loads D for it
TRAINS = False  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
TITLE = 'clp (Channel Lipschitzness-based Pruning, data-free)'  # of its argument group in baseline_defence.py's help


def purify(suspect: SimCLR, clean, run) -> tuple[SimCLR, dict]:
    """CLP on a copy of the suspect (data-free: `clean` is not used)."""
    model = copy.deepcopy(suspect)
    report = clp(model, run.args.clp_u)
    print(f"clp: pruned {report['channels_pruned']} of {report['channels_total']} channels (u = {run.args.clp_u}); "
          f"largest z-score {max(report['max_z'].values()):.2f}")
    return model, report


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--clp_u', default=3.0, type=float,
                       help="prune the channels whose Lipschitz upper bound exceeds mean + u·std of their layer "
                            "(default: 3, CLP's; other values are a diagnostic sweep, not CLP's recipe; a layer of "
                            "n channels can reach at most (n-1)/sqrt(n))")


def check(args: argparse.Namespace) -> None:
    if not args.clp_u >= 0:
        raise UsageError(f'--clp_u must be non-negative, got {args.clp_u}')
