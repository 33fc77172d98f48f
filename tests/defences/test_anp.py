"""ANP (defences/anp.py): the perturbed BatchNorm, the adversarial and mask steps, the pruning, on tiny models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from defences.anp import (adversarial_noise, anp, anp_masks, bn_neurons, contrastive_loss, perturbed_bn_params,
                          prune_by_threshold, signed_ascent)
from models.losses import nt_xent
from defence_helpers import CIFAR_NORMALIZATION, DEVICE, random_images
from defence_helpers import encoder  # noqa: F401  (fixtures)


def test_unperturbed_forward_with_unit_masks_is_the_plain_forward(encoder):
    x = torch.randn(4, 3, 32, 32)
    bns = bn_neurons(encoder)
    assert all(name.startswith('f.f.') for name in bns)  # state_dict names
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}
    zeros = {name: torch.zeros_like(bn.weight) for name, bn in bns.items()}
    plain = encoder(x)
    for params in (perturbed_bn_params(bns, masks), perturbed_bn_params(bns, masks, zeros, zeros)):
        for got, expected in zip(torch.func.functional_call(encoder, params, (x,)), plain):
            assert torch.equal(got, expected)


def test_perturbed_bn_params_formula():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([1.0, -1.0]))
    masks, noise_w, noise_b = {'b': torch.tensor([0.5, 1.0])}, {'b': torch.tensor([0.1, -0.2])}, \
        {'b': torch.tensor([0.4, 0.2])}
    params = perturbed_bn_params({'b': bn}, masks, noise_w, noise_b)
    assert torch.allclose(params['b.weight'], torch.tensor([2.0 * 0.6, 3.0 * 0.8]))
    assert torch.allclose(params['b.bias'], torch.tensor([1.4, -1.2]))
    plain = perturbed_bn_params({'b': bn}, masks)
    assert torch.allclose(plain['b.weight'], torch.tensor([1.0, 3.0])) and torch.equal(plain['b.bias'], bn.bias)


def test_signed_ascent_projects_only_in_the_papers_mode():
    noise, grad = torch.tensor([0.3, -0.3, 0.0, 0.1]), torch.tensor([2.0, -0.5, 1e-9, -3.0])
    assert torch.allclose(signed_ascent(noise, grad, 0.4, 1, 'code'), torch.tensor([0.7, -0.7, 0.4, -0.3]))
    assert torch.allclose(signed_ascent(noise, grad, 0.4, 1, 'paper'), torch.tensor([0.4, -0.4, 0.4, -0.3]))
    assert torch.allclose(signed_ascent(noise, grad, 0.4, 2, 'code'), torch.tensor([0.5, -0.5, 0.2, -0.1]))


def test_contrastive_loss_has_a_gradient_at_unit_masks(encoder):
    """The former objective (−cos to the suspect's own features) sat at its minimum at m = 1; NT-Xent does not."""
    generator = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(8, 3, 32, 32, generator=generator), torch.randn(8, 3, 32, 32, generator=generator)
    bns = bn_neurons(encoder)
    masks = {name: torch.ones_like(bn.weight, requires_grad=True) for name, bn in bns.items()}
    loss = contrastive_loss(encoder, perturbed_bn_params(bns, masks), v1, v2, 0.5)
    with torch.no_grad():
        expected = nt_xent(encoder(v1)[1], encoder(v2)[1], 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, list(masks.values()))
    assert sum(grad.abs().sum() for grad in grads) > 0


def test_adversarial_step_increases_the_loss(encoder):
    generator = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(8, 3, 32, 32, generator=generator), torch.randn(8, 3, 32, 32, generator=generator)
    bns = bn_neurons(encoder)
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}

    def loss_of(noise_w, noise_b):
        return contrastive_loss(encoder, perturbed_bn_params(bns, masks, noise_w, noise_b), v1, v2, 0.5)
    start = adversarial_noise(loss_of, bns, eps=0.4, steps=0, generator=torch.Generator().manual_seed(3))
    for perturbation, bound in (('code', 0.8), ('paper', 0.4)):
        noise_w, noise_b = adversarial_noise(loss_of, bns, eps=0.4, steps=1, perturbation=perturbation,
                                             generator=torch.Generator().manual_seed(3))
        values = torch.cat([*noise_w.values(), *noise_b.values()]).abs()
        assert values.max() <= bound + 1e-6
        with torch.no_grad():
            assert loss_of(noise_w, noise_b) > loss_of(*start)
    assert torch.cat([*noise_w.values()]).abs().max() <= 0.4  # the paper's mode stays in the ball
    code_w, _ = adversarial_noise(loss_of, bns, eps=0.4, steps=1, generator=torch.Generator().manual_seed(3))
    assert torch.cat([*code_w.values()]).abs().max() > 0.4  # the code's does not


def test_anp_masks_run_in_range_and_leave_the_model_alone(encoder):
    images = random_images(12, 32, seed=2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []
    for bn_stats in ('running', 'batch'):
        masks = anp_masks(encoder, images, CIFAR_NORMALIZATION, DEVICE, eps=0.4, steps=1, alpha=0.2, lr=0.2,
                          iterations=3, batch_size=4, bn_stats=bn_stats, generator=torch.Generator().manual_seed(0),
                          on_iteration=lambda i, terms: seen.append((i, terms)))
        bns = bn_neurons(encoder)
        assert masks.keys() == bns.keys()
        assert all(masks[name].shape == bn.weight.shape for name, bn in bns.items())
        assert all(0 <= mask.min() and mask.max() <= 1 for mask in masks.values())
        assert any((mask < 1).any() for mask in masks.values())  # the masks moved
    assert [i for i, _ in seen] == [1, 2, 3] * 2 and all(math.isfinite(t['loss']) for _, t in seen)
    after = encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in encoder.parameters())
    assert not encoder.training


def test_prune_by_threshold_zeroes_exactly_the_low_masks(encoder):
    bns = bn_neurons(encoder)
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}
    masks['f.f.1'][[1, 6]] = torch.tensor([0.1, 0.2])  # 0.2 is pruned: ANP prunes mask <= threshold
    masks['f.f.6.1.bn2'][0] = 0.25
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    report = prune_by_threshold(encoder, masks, threshold=0.2)
    assert report['pruned'] == {'f.f.1': [1, 6]} and report['neurons_pruned'] == 2
    assert report['min_mask'] == {name: (0.1 if name == 'f.f.1' else 0.25 if name == 'f.f.6.1.bn2' else 1.0)
                                  for name in bns}
    after = encoder.state_dict()
    expected = before['f.f.1.weight'].clone()
    expected[[1, 6]] = 0
    assert torch.equal(after['f.f.1.weight'], expected)
    assert all(torch.equal(after[k], before[k]) for k in before if k != 'f.f.1.weight')  # biases kept


def test_anp_end_to_end_report(encoder):
    images = random_images(8, 32, seed=4)
    keys = {k: v.shape for k, v in encoder.state_dict().items()}
    report = anp(encoder, images, CIFAR_NORMALIZATION, DEVICE, iterations=2, batch_size=4, threshold=0.9,
                 generator=torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in encoder.state_dict().items()} == keys
    assert report['settings']['iterations'] == 2 and report['settings']['eps'] == 0.4
    assert report['settings']['perturbation'] == 'code' and report['settings']['bn_stats'] == 'running'
    flat = [(name, i) for name, values in report['masks'].items() for i, v in enumerate(values) if v <= 0.9]
    assert sorted(flat) == sorted((name, i) for name, idx in report['pruned'].items() for i in idx)
    assert report['min_mask'] == pytest.approx({name: min(values) for name, values in report['masks'].items()})
    for name, indices in report['pruned'].items():
        assert (encoder.state_dict()[f'{name}.weight'][indices] == 0).all()
    with pytest.raises(TypeError, match='unknown settings'):
        anp(encoder, images, CIFAR_NORMALIZATION, DEVICE, iteration=1)
