"""Adversarial Neuron Pruning (ANP; Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021), with a label-free objective for a suspect SimCLR encoder.

The recipe as published (paper §4 and its code, github.com/csdongxian/ANP_backdoor,
`optimize_mask_cifar.py`, `models/anp_batchnorm.py`, `prune_neuron_cifar.py`):
- every BatchNorm neuron k has a mask m_k ∈ [0, 1] (initialised to 1) and multiplicative perturbations δ_k
  of its weight and ξ_k of its bias: the layer computes BN with weight γ_k·(m_k + δ_k) and bias β_k·(1 + ξ_k)
  (`NoisyBatchNorm2d`), and with weight γ_k·m_k and bias β_k when unperturbed;
- for each batch, δ and ξ start uniform in [−ε, ε] and take `anp_steps` = 1 signed-gradient ascent step of
  size ε/anp_steps on the loss (ε = 0.4); the paper bounds them by ε — the released code takes the step
  without projecting back, we clip to [−ε, ε] as the paper states;
- the masks take one SGD step (lr 0.2, momentum 0.9) on α·L(m) + (1 − α)·L(m, δ, ξ), α = 0.2, and are
  clipped to [0, 1]; 2000 iterations of batch 128, batches drawn with replacement (`RandomSampler`);
- pruning by threshold: every neuron whose mask is ≤ the threshold has its BN weight set to 0 (the bias is
  kept); 0.2 is the paper's threshold (the code's `evaluate_by_threshold` tests `mask <= threshold`).

Adaptation to the label-free setting: there are no labels, so L is the shift of the encoder's features on
the clean subset D away from the suspect's own,
    L(m, δ, ξ) = −mean_b cos(f_{m,δ,ξ}(x_b), f_suspect(x_b))            (`models.losses.negative_cosine`)
where f_suspect(x) is computed once on un-augmented D and cached (the suspect is frozen and D is not
augmented, so it never changes). The perturbation maximises the shift and the masks minimise it, as ANP's
perturbation maximises and its masks minimise the cross-entropy. D is used un-augmented (ANP's code crops
and flips its clean images) so that the cached targets stay valid.

BatchNorm stays in eval mode. ANP's code runs the mask optimisation in train mode, where every layer
normalises with the statistics of the current batch; an encoder's BatchNorm statistics are fixed facts of
its pre-training data, and in eval mode masks of 1 with no perturbation reproduce the suspect exactly, so
L(1) is the objective's minimum and any shift is due to the masks and perturbations alone (in train mode a
batch of 128 clean images would shift every feature before any neuron were touched).

The masked and perturbed forward replaces the BN weights and biases through `torch.func.functional_call`,
so the model's modules and state_dict keys are never changed; pruning writes zeros into the model's own BN
weights, so the purified encoder stays a plain SimCLR state_dict.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call
from tqdm import tqdm

from common.cli import require_positive
from common.errors import UsageError
from common.features import encode_images
from datasets import normalize_batch
from models import SimCLR
from models.losses import negative_cosine

ANP_SETTINGS = {'eps': 0.4, 'steps': 1, 'alpha': 0.2, 'lr': 0.2, 'iterations': 2000, 'batch_size': 128,
                'threshold': 0.2}  # the paper's and the released code's defaults


def bn_neurons(model_f: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm2d of `model_f` by its name relative to `model_f`: the neurons ANP masks."""
    return {name: module for name, module in model_f.named_modules() if isinstance(module, nn.BatchNorm2d)}


def perturbed_bn_params(bns: dict[str, nn.BatchNorm2d], masks: dict[str, torch.Tensor],
                        noise_w: dict[str, torch.Tensor] | None = None,
                        noise_b: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The BN parameters of the masked (and perturbed) network, for `functional_call`.

    For each layer, weight = γ·(m + δ) and bias = β·(1 + ξ); without noise, weight = γ·m and bias = β.
    Every tensor is (C,), the layer's channels. Returns {'<name>.weight': .., '<name>.bias': ..}.
    """
    params = {}
    for name, bn in bns.items():
        weight, bias = bn.weight.detach(), bn.bias.detach()
        if noise_w is None:
            params[f'{name}.weight'], params[f'{name}.bias'] = weight * masks[name], bias
        else:
            params[f'{name}.weight'] = weight * (masks[name] + noise_w[name])
            params[f'{name}.bias'] = bias * (1 + noise_b[name])
    return params


def feature_shift(model_f: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                  reference: torch.Tensor) -> torch.Tensor:
    """L = −mean_b cos(f_params(x_b), reference_b): x (B, 3, H, W), reference (B, d) -> scalar."""
    return negative_cosine(functional_call(model_f, params, (x,)), reference)


def adversarial_noise(model_f: nn.Module, bns: dict[str, nn.BatchNorm2d], masks: dict[str, torch.Tensor],
                      x: torch.Tensor, reference: torch.Tensor, eps: float, steps: int,
                      generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """ANP's inner maximisation: δ, ξ ~ U[−ε, ε], then `steps` ascent steps
    δ ← clip(δ + (ε/steps)·sign(∇_δ L), −ε, ε) (likewise ξ) on the feature shift L of the batch x.

    Returns (noise_w, noise_b), detached, each {name: (C,)}.
    """
    noise_w, noise_b = {}, {}
    for name, bn in bns.items():
        for noise in (noise_w, noise_b):
            start = torch.rand(bn.num_features, generator=generator, dtype=bn.weight.dtype)
            noise[name] = ((2 * start - 1) * eps).to(bn.weight.device)
    masks = {name: mask.detach() for name, mask in masks.items()}
    for _ in range(steps):
        leaves = [*noise_w.values(), *noise_b.values()]
        for leaf in leaves:
            leaf.requires_grad_(True)
        loss = feature_shift(model_f, perturbed_bn_params(bns, masks, noise_w, noise_b), x, reference)
        grads = torch.autograd.grad(loss, leaves)  # the encoder's own weights receive no gradient
        updated = [(leaf + eps / steps * grad.sign()).clamp(-eps, eps).detach() for leaf, grad in zip(leaves, grads)]
        noise_w = dict(zip(noise_w, updated[:len(noise_w)]))
        noise_b = dict(zip(noise_b, updated[len(noise_w):]))
    return noise_w, noise_b


def anp_masks(model: SimCLR, images: np.ndarray, normalization, device: torch.device, *,
              eps: float = ANP_SETTINGS['eps'], steps: int = ANP_SETTINGS['steps'],
              alpha: float = ANP_SETTINGS['alpha'], lr: float = ANP_SETTINGS['lr'],
              iterations: int = ANP_SETTINGS['iterations'], batch_size: int = ANP_SETTINGS['batch_size'],
              generator: torch.Generator | None = None,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, torch.Tensor]:
    """Optimise ANP's neuron masks of `model.f` (on `device`) on the uint8 clean images (N, H, W, 3).

    Each iteration draws a batch with replacement, finds the adversarial perturbation, and takes one SGD
    step (momentum 0.9) on α·L(m) + (1 − α)·L(m, δ, ξ), then clips the masks to [0, 1]. `on_iteration`
    receives (iteration, {'loss', 'loss_natural', 'loss_perturbed'}). The model is not modified.
    Returns {bn name relative to model.f: mask (C,)} on `device`.
    """
    model_f = model.f
    modes = [(module, module.training) for module in model_f.modules()]
    reference = encode_images(model_f, images, normalization, device, disable_progress=True)  # (N, d), once
    model_f.eval()  # BN running statistics stay fixed (see the module docstring)
    device_images = torch.as_tensor(images).to(device)
    bns = bn_neurons(model_f)
    masks = {name: torch.ones_like(bn.weight, requires_grad=True) for name, bn in bns.items()}
    optimizer = torch.optim.SGD(list(masks.values()), lr=lr, momentum=0.9)
    for iteration in range(1, iterations + 1):
        index = torch.randint(len(images), (batch_size,), generator=generator).to(device)  # with replacement
        x = normalize_batch(device_images[index], normalization)  # (B, 3, H, W)
        target = reference[index]  # (B, d)
        if eps > 0:
            noise_w, noise_b = adversarial_noise(model_f, bns, masks, x, target, eps, steps, generator)
            loss_perturbed = feature_shift(model_f, perturbed_bn_params(bns, masks, noise_w, noise_b), x, target)
        else:
            loss_perturbed = torch.zeros((), device=device)
        loss_natural = feature_shift(model_f, perturbed_bn_params(bns, masks), x, target)
        loss = alpha * loss_natural + (1 - alpha) * loss_perturbed
        grads = torch.autograd.grad(loss, list(masks.values()))
        for mask, grad in zip(masks.values(), grads):
            mask.grad = grad
        optimizer.step()
        with torch.no_grad():
            for mask in masks.values():
                mask.clamp_(0, 1)
        if on_iteration is not None:
            on_iteration(iteration, {'loss': loss.item(), 'loss_natural': loss_natural.item(),
                                     'loss_perturbed': loss_perturbed.item()})
    for module, training in modes:
        module.training = training
    return {name: mask.detach() for name, mask in masks.items()}


@torch.no_grad()
def prune_by_threshold(model: SimCLR, masks: dict[str, torch.Tensor], threshold: float) -> dict:
    """Zero, in place, the BN weight of every neuron of `model.f` whose mask is ≤ threshold (ANP's pruning).

    `masks` is keyed by BN names relative to model.f (as `anp_masks` returns them). Returns {'threshold',
    'pruned': {bn name in the SimCLR state_dict, e.g. 'f.f.1': [channels]}, 'neurons_pruned', 'neurons_total'};
    layers with nothing pruned are left out of 'pruned'.
    """
    bns = bn_neurons(model.f)
    pruned, total = {}, 0
    for name, mask in masks.items():
        flagged = torch.nonzero(mask <= threshold).flatten().to(bns[name].weight.device)  # (n_flagged,)
        bns[name].weight[flagged] = 0
        total += len(mask)
        if len(flagged):
            pruned[f'f.{name}'] = flagged.tolist()
    return {'threshold': threshold, 'pruned': pruned, 'neurons_pruned': sum(map(len, pruned.values())),
            'neurons_total': total}


def anp(model: SimCLR, images: np.ndarray, normalization, device: torch.device, *,
        threshold: float = ANP_SETTINGS['threshold'], generator: torch.Generator | None = None,
        on_iteration: Callable[[int, dict[str, float]], None] | None = None, **settings) -> dict:
    """ANP on the suspect `model` (on `device`), in place: optimise the masks on the clean images, then prune.

    `settings` override ANP_SETTINGS' eps, steps, alpha, lr, iterations, batch_size. Returns the pruning
    report of `prune_by_threshold`, plus 'settings' and 'masks' ({state_dict BN name: [mask values]}).
    """
    unknown = set(settings) - set(ANP_SETTINGS)
    if unknown:
        raise TypeError(f'anp: unknown settings {sorted(unknown)}, expected some of {sorted(ANP_SETTINGS)}')
    resolved = {**ANP_SETTINGS, **settings, 'threshold': threshold}
    masks = anp_masks(model, images, normalization, device, generator=generator, on_iteration=on_iteration,
                      **{key: value for key, value in resolved.items() if key != 'threshold'})
    report = prune_by_threshold(model, masks, threshold)
    return {**report, 'settings': resolved, 'masks': {f'f.{name}': mask.tolist() for name, mask in masks.items()}}


PAPER = 'Wu & Wang, Adversarial Neuron Pruning, NeurIPS 2021 (label-free objective)'
READS = 'the suspect and D: its features of D, unaugmented'
READS_IMAGES = True  # whether baseline_defence.py loads D for it
TITLE = 'anp (Adversarial Neuron Pruning; batch: --batch_size)'  # of its argument group in baseline_defence.py's help


def purify(suspect: SimCLR, clean: np.ndarray, run) -> tuple[SimCLR, dict]:
    """ANP on a copy of the suspect: masks learnt on D (`--anp_*`, batch --batch_size), then pruned."""
    args = run.args
    model = copy.deepcopy(suspect)
    with tqdm(total=args.anp_iterations, desc='ANP masks', disable=run.disable_progress) as bar:
        def on_iteration(iteration: int, losses: dict) -> None:
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
            bar.update(1)
        report = anp(model, clean, run.normalization, run.device, threshold=args.anp_threshold,
                     generator=torch.Generator().manual_seed(args.seed), on_iteration=on_iteration,
                     eps=args.anp_eps, steps=args.anp_steps, alpha=args.anp_alpha, lr=args.anp_lr,
                     iterations=args.anp_iterations, batch_size=args.batch_size)
    print(f"anp: pruned {report['neurons_pruned']} of {report['neurons_total']} BN neurons "
          f'(mask <= {args.anp_threshold})')
    return model, report


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--anp_eps', default=ANP_SETTINGS['eps'], type=float,
                       help=f"bound of the adversarial BN perturbations (default: {ANP_SETTINGS['eps']}, ANP's)")
    group.add_argument('--anp_steps', default=ANP_SETTINGS['steps'], type=int,
                       help=f"sign-gradient steps of the perturbation (default: {ANP_SETTINGS['steps']})")
    group.add_argument('--anp_alpha', default=ANP_SETTINGS['alpha'], type=float,
                       help='weight of the unperturbed loss, α·L(m) + (1−α)·L(m, δ, ξ) '
                            f"(default: {ANP_SETTINGS['alpha']})")
    group.add_argument('--anp_lr', default=ANP_SETTINGS['lr'], type=float,
                       help=f"SGD learning rate of the masks (default: {ANP_SETTINGS['lr']})")
    group.add_argument('--anp_iterations', default=ANP_SETTINGS['iterations'], type=int,
                       help=f"mask optimisation steps (default: {ANP_SETTINGS['iterations']})")
    group.add_argument('--anp_threshold', default=ANP_SETTINGS['threshold'], type=float,
                       help=f"prune the BN neurons whose mask is at most this (default: {ANP_SETTINGS['threshold']})")


def check(args: argparse.Namespace) -> None:
    for flag in ('anp_iterations', 'anp_steps'):
        require_positive(f'--{flag}', getattr(args, flag))
    if not 0 <= args.anp_threshold <= 1 or not args.anp_eps >= 0:
        raise UsageError(f'--anp_threshold must lie in [0, 1] and --anp_eps be non-negative, got '
                         f'{args.anp_threshold} and {args.anp_eps}')
