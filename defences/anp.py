"""Adversarial Neuron Pruning (ANP; Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021), with a label-free objective for a suspect SimCLR encoder.

The recipe as published (paper §4 and its code, github.com/csdongxian/ANP_backdoor,
`optimize_mask_cifar.py`, `models/anp_batchnorm.py`, `prune_neuron_cifar.py`):
- every BatchNorm neuron k has a mask m_k ∈ [0, 1] (initialised to 1) and multiplicative perturbations δ_k
  of its weight and ξ_k of its bias: the layer computes BN with weight γ_k·(m_k + δ_k) and bias β_k·(1 + ξ_k)
  (`NoisyBatchNorm2d`), and with weight γ_k·m_k and bias β_k when unperturbed;
- for each batch, δ and ξ start uniform in [−ε, ε] and take `anp_steps` = 1 signed-gradient ascent step of
  size ε/anp_steps on the loss (ε = 0.4). The code takes that step without projecting back, so δ, ξ end in
  [−2ε, 2ε] (the adversary's default here, `--anp_perturbation code`); the paper bounds them by ε, which
  `--anp_perturbation paper` does by clipping to [−ε, ε] after each step;
- the masks take one SGD step (lr 0.2, momentum 0.9) on α·L(m) + (1 − α)·L(m, δ, ξ), α = 0.2, and are
  clipped to [0, 1]; 2000 iterations of batch 128, batches drawn with replacement (`RandomSampler`) from the
  clean set with the code's training augmentation; the network is in training mode throughout, so BatchNorm
  normalises with each batch's statistics;
- pruning by threshold: every neuron whose mask is ≤ the threshold has its BN weight set to 0 (the bias is
  kept); 0.2 is the paper's threshold (the code's `evaluate_by_threshold` tests `mask <= threshold`).

Adaptation to the label-free setting: L is the encoder's own self-supervised loss on D, SimCLR's NT-Xent of the
projections of two augmented views (τ = --knn-t), as `ft`, `fp` and `nad` train with it:
    L(m, δ, ξ) = NT-Xent(g(f_{m,δ,ξ}(v1)), g(f_{m,δ,ξ}(v2)))              (`models.losses.nt_xent`)
with v1, v2 SimCLR views of the batch (`datasets.tensor_augment.simclr_views`). The perturbation maximises it
and the masks minimise it, as ANP's perturbation maximises and its masks minimise the cross-entropy. The masks
and perturbations are on the BatchNorms of the encoder f (the projection head g, which downstream tasks do not
use, is not masked).
BatchNorm normalises with the suspect's running statistics (`--anp_bn_stats running`, the default), where ANP's
code normalises with each batch's (`--anp_bn_stats batch`, on a private copy whose statistics are thrown away).
The reason is the projection head: a backdoor neuron, perturbed, pushes every clean embedding the same way (the
collapse it causes on triggered inputs), and with batch statistics the BatchNorm1d of g subtracts exactly such a
shift common to the batch before the NT-Xent sees it; a classifier has no BatchNorm after its last layer, so
ANP's cross-entropy sees the shift in either mode. On the positive control (a planted trigger-detecting stem
neuron, tests/defences/test_positive_controls.py) running statistics prune that neuron and nothing else within 40
iterations; batch statistics prune it together with several random neurons.
Why not the shift of the features from the suspect's own (−cos to cached features, BatchNorm in eval mode, the
former objective): that loss is at its minimum, with zero gradient, at m = 1 and no perturbation, so only the
perturbed term could move the masks; NT-Xent on augmented views is the loss the encoder was trained with, has a
non-zero gradient at m = 1, and rises when a perturbed neuron collapses the embeddings — the part the
cross-entropy plays for a classifier (docs/DESIGN.md §13.1).

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
from core.cli import same_on_resume
from core.errors import UsageError
from datasets.tensor_augment import simclr_views
from models import SimCLR
from models.losses import nt_xent

ANP_SETTINGS = {'eps': 0.4, 'steps': 1, 'alpha': 0.2, 'lr': 0.2, 'iterations': 2000, 'batch_size': 128,
                'threshold': 0.2, 'perturbation': 'code', 'temperature': 0.5,
                'bn_stats': 'running'}  # the paper's and code's defaults; NT-Xent's τ and BN statistics: ours
BN_STATS = ('running', 'batch')
PERTURBATIONS = ('code', 'paper')  # no projection after the signed step (the code), or clipped to ±ε (the paper)


def bn_neurons(model: SimCLR) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm2d of the encoder `model.f` by its name in the SimCLR state_dict (e.g. 'f.f.1'): the neurons
    ANP masks."""
    return {f'f.{name}': module for name, module in model.f.named_modules() if isinstance(module, nn.BatchNorm2d)}


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


def contrastive_loss(model: SimCLR, params: dict[str, torch.Tensor], v1: torch.Tensor, v2: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """L = NT-Xent(g(f_params(v1)), g(f_params(v2))): two views (B, 3, H, W) -> scalar, BN params replaced."""
    _, out_1 = functional_call(model, params, (v1,))
    _, out_2 = functional_call(model, params, (v2,))
    return nt_xent(out_1.float(), out_2.float(), temperature)


def signed_ascent(noise: torch.Tensor, grad: torch.Tensor, eps: float, steps: int, perturbation: str) -> torch.Tensor:
    """One step of ANP's inner maximisation: δ + (ε/steps)·sign(∇_δ L), clipped to [−ε, ε] for 'paper' and left
    as is for 'code' (ANP's released code does not project)."""
    updated = noise + eps / steps * grad.sign()
    return updated.clamp(-eps, eps) if perturbation == 'paper' else updated


def adversarial_noise(loss_of: Callable[[dict, dict], torch.Tensor], bns: dict[str, nn.BatchNorm2d], eps: float,
                      steps: int, perturbation: str = 'code',
                      generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """ANP's inner maximisation: δ, ξ ~ U[−ε, ε], then `steps` signed ascent steps (`signed_ascent`) on
    loss_of(noise_w, noise_b), the loss of the masked network with the perturbation.

    Returns (noise_w, noise_b), detached, each {name: (C,)}.
    """
    noise_w, noise_b = {}, {}
    for name, bn in bns.items():
        for noise in (noise_w, noise_b):
            start = torch.rand(bn.num_features, generator=generator, dtype=bn.weight.dtype)
            noise[name] = ((2 * start - 1) * eps).to(bn.weight.device)
    for _ in range(steps):
        leaves = [*noise_w.values(), *noise_b.values()]
        for leaf in leaves:
            leaf.requires_grad_(True)
        grads = torch.autograd.grad(loss_of(noise_w, noise_b), leaves)  # the encoder's weights get no gradient
        updated = [signed_ascent(leaf, grad, eps, steps, perturbation).detach() for leaf, grad in zip(leaves, grads)]
        noise_w = dict(zip(noise_w, updated[:len(noise_w)]))
        noise_b = dict(zip(noise_b, updated[len(noise_w):]))
    return noise_w, noise_b


def anp_masks(model: SimCLR, images: np.ndarray, normalization, device: torch.device, *,
              eps: float = ANP_SETTINGS['eps'], steps: int = ANP_SETTINGS['steps'],
              alpha: float = ANP_SETTINGS['alpha'], lr: float = ANP_SETTINGS['lr'],
              iterations: int = ANP_SETTINGS['iterations'], batch_size: int = ANP_SETTINGS['batch_size'],
              perturbation: str = ANP_SETTINGS['perturbation'], temperature: float = ANP_SETTINGS['temperature'],
              bn_stats: str = ANP_SETTINGS['bn_stats'], generator: torch.Generator | None = None,
              augment_generator: torch.Generator | None = None,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, torch.Tensor]:
    """Optimise ANP's neuron masks of `model.f` (on `device`) on the uint8 clean images (N, H, W, 3).

    Each iteration draws a batch with replacement (`generator`, CPU) and two SimCLR views of it
    (`augment_generator`, on `device`), finds the adversarial perturbation, and takes one SGD step (momentum 0.9)
    on α·L(m) + (1 − α)·L(m, δ, ξ), then clips the masks to [0, 1]. `on_iteration` receives (iteration,
    {'loss', 'loss_natural', 'loss_perturbed'}). The forwards run on a copy, BatchNorm normalising with its running
    statistics (`bn_stats` 'running') or each batch's ('batch'); `model` is not modified.
    Returns {bn name in the SimCLR state_dict: mask (C,)} on `device`.
    """
    probe = copy.deepcopy(model).train(bn_stats == 'batch').requires_grad_(False)  # its statistics are thrown away
    device_images = torch.as_tensor(images).to(device)
    bns = bn_neurons(probe)
    masks = {name: torch.ones_like(bn.weight, requires_grad=True) for name, bn in bns.items()}
    optimizer = torch.optim.SGD(list(masks.values()), lr=lr, momentum=0.9)
    for iteration in range(1, iterations + 1):
        index = torch.randint(len(images), (batch_size,), generator=generator).to(device)  # with replacement
        batch = device_images[index]  # (B, H, W, 3) uint8
        v1 = simclr_views(batch, normalization, augment_generator)  # (B, 3, H, W)
        v2 = simclr_views(batch, normalization, augment_generator)
        if eps > 0:
            fixed = {name: mask.detach() for name, mask in masks.items()}
            noise_w, noise_b = adversarial_noise(
                lambda w, b: contrastive_loss(probe, perturbed_bn_params(bns, fixed, w, b), v1, v2, temperature),
                bns, eps, steps, perturbation, generator)
            loss_perturbed = contrastive_loss(probe, perturbed_bn_params(bns, masks, noise_w, noise_b), v1, v2,
                                              temperature)
        else:
            loss_perturbed = torch.zeros((), device=device)
        loss_natural = contrastive_loss(probe, perturbed_bn_params(bns, masks), v1, v2, temperature)
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
    return {name: mask.detach() for name, mask in masks.items()}


@torch.no_grad()
def prune_by_threshold(model: SimCLR, masks: dict[str, torch.Tensor], threshold: float) -> dict:
    """Zero, in place, the BN weight of every neuron of `model.f` whose mask is ≤ threshold (ANP's pruning).

    `masks` is keyed by the BN names of the SimCLR state_dict (as `anp_masks` returns them). Returns {'threshold',
    'pruned': {bn name, e.g. 'f.f.1': [channels]}, 'neurons_pruned', 'neurons_total', 'min_mask': {bn name: the
    layer's smallest mask}}; layers with nothing pruned are left out of 'pruned', every layer is in 'min_mask'.
    """
    bns = bn_neurons(model)
    pruned, total = {}, 0
    for name, mask in masks.items():
        flagged = torch.nonzero(mask <= threshold).flatten().to(bns[name].weight.device)  # (n_flagged,)
        bns[name].weight[flagged] = 0
        total += len(mask)
        if len(flagged):
            pruned[name] = flagged.tolist()
    return {'threshold': threshold, 'pruned': pruned, 'neurons_pruned': sum(map(len, pruned.values())),
            'neurons_total': total, 'min_mask': {name: round(mask.min().item(), 6) for name, mask in masks.items()}}


def anp(model: SimCLR, images: np.ndarray, normalization, device: torch.device, *,
        threshold: float = ANP_SETTINGS['threshold'], generator: torch.Generator | None = None,
        augment_generator: torch.Generator | None = None,
        on_iteration: Callable[[int, dict[str, float]], None] | None = None, **settings) -> dict:
    """ANP on the suspect `model` (on `device`), in place: optimise the masks on the clean images, then prune.

    `settings` override ANP_SETTINGS' eps, steps, alpha, lr, iterations, batch_size, perturbation, temperature,
    bn_stats.
    Returns the pruning report of `prune_by_threshold`, plus 'settings' and 'masks' ({BN name: [mask values]}).
    """
    unknown = set(settings) - set(ANP_SETTINGS)
    if unknown:
        raise TypeError(f'anp: unknown settings {sorted(unknown)}, expected some of {sorted(ANP_SETTINGS)}')
    resolved = {**ANP_SETTINGS, **settings, 'threshold': threshold}
    masks = anp_masks(model, images, normalization, device, generator=generator, augment_generator=augment_generator,
                      on_iteration=on_iteration, **{key: value for key, value in resolved.items() if key != 'threshold'})
    report = prune_by_threshold(model, masks, threshold)
    return {**report, 'settings': resolved, 'masks': {name: mask.tolist() for name, mask in masks.items()}}


PAPER = 'Wu & Wang, Adversarial Neuron Pruning, NeurIPS 2021 (label-free objective: NT-Xent on D)'
READS = 'the suspect and D: SimCLR views of D, drawn with replacement'
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = False  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
# why baseline_defence.py refuses it for a real-world encoder (docs/DESIGN.md §13)
CIFAR_ONLY = ("it masks the BatchNorm neurons through torch.func.functional_call by the CIFAR SimCLR's parameter "
              'names (f.f.*), which a real-world tower (visual.*) does not have')
TITLE = 'anp (Adversarial Neuron Pruning; batch: --batch_size, NT-Xent temperature: --knn-t)'  # its help group


def purify(suspect: SimCLR, clean: np.ndarray, run) -> tuple[SimCLR, dict]:
    """ANP on a copy of the suspect: masks learnt on D (`--anp_*`, batch --batch_size), then pruned."""
    args = run.args
    model = copy.deepcopy(suspect)
    with tqdm(total=args.anp_iterations, desc='ANP masks', disable=run.disable_progress) as bar:
        def on_iteration(iteration: int, losses: dict) -> None:
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
            bar.update(1)
        report = anp(model, clean, run.normalization, run.device, threshold=args.anp_threshold,
                     generator=torch.Generator().manual_seed(args.seed),
                     augment_generator=torch.Generator(device=run.device).manual_seed(args.seed),
                     on_iteration=on_iteration, eps=args.anp_eps, steps=args.anp_steps, alpha=args.anp_alpha,
                     lr=args.anp_lr, iterations=args.anp_iterations, batch_size=args.batch_size,
                     perturbation=args.anp_perturbation, temperature=args.knn_t, bn_stats=args.anp_bn_stats)
    lowest = min(report['min_mask'].items(), key=lambda item: item[1])
    print(f"anp: pruned {report['neurons_pruned']} of {report['neurons_total']} BN neurons "
          f'(mask <= {args.anp_threshold}); smallest mask {lowest[1]:.3f} in {lowest[0]}')
    return model, report


def add_arguments(group: argparse._ArgumentGroup) -> None:
    same_on_resume(group.add_argument(
        '--anp_eps', default=ANP_SETTINGS['eps'], type=float,
        help=f"size ε of the adversarial BN perturbations (default: {ANP_SETTINGS['eps']}, ANP's)"))
    same_on_resume(group.add_argument(
        '--anp_steps', default=ANP_SETTINGS['steps'], type=int,
        help=f"sign-gradient steps of the perturbation (default: {ANP_SETTINGS['steps']})"))
    same_on_resume(group.add_argument(
        '--anp_perturbation', default=ANP_SETTINGS['perturbation'], choices=PERTURBATIONS,
        help="code: uniform start in [-ε, ε], signed steps of ε/steps, no projection (ANP's released code, the "
             'default); paper: the same, clipped to [-ε, ε] after each step (the bound the paper states)'))
    same_on_resume(group.add_argument(
        '--anp_bn_stats', default=ANP_SETTINGS['bn_stats'], choices=BN_STATS,
        help="BatchNorm during the mask optimisation: running: the suspect's running statistics (default; the "
             "projection head's batch statistics would absorb the common shift a backdoor neuron causes); batch: "
             "each batch's, as ANP's code trains"))
    same_on_resume(group.add_argument(
        '--anp_alpha', default=ANP_SETTINGS['alpha'], type=float,
        help=f"weight of the unperturbed loss, α·L(m) + (1−α)·L(m, δ, ξ) (default: {ANP_SETTINGS['alpha']})"))
    same_on_resume(group.add_argument(
        '--anp_lr', default=ANP_SETTINGS['lr'], type=float,
        help=f"SGD learning rate of the masks (default: {ANP_SETTINGS['lr']})"))
    same_on_resume(group.add_argument(
        '--anp_iterations', default=ANP_SETTINGS['iterations'], type=int,
        help=f"mask optimisation steps (default: {ANP_SETTINGS['iterations']}, ANP's)"))
    same_on_resume(group.add_argument(
        '--anp_threshold', default=ANP_SETTINGS['threshold'], type=float,
        help=f"prune the BN neurons whose mask is at most this (default: {ANP_SETTINGS['threshold']})"))


def check(args: argparse.Namespace) -> None:
    for flag in ('anp_iterations', 'anp_steps'):
        require_positive(f'--{flag}', getattr(args, flag))
    if not 0 <= args.anp_threshold <= 1:
        raise UsageError(f'--anp_threshold must lie in [0, 1], got {args.anp_threshold}')
    if not args.anp_eps >= 0:
        raise UsageError(f'--anp_eps must be non-negative, got {args.anp_eps}')
    if not 0 <= args.anp_alpha <= 1:
        raise UsageError(f'--anp_alpha must lie in [0, 1], got {args.anp_alpha}')
