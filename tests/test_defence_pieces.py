"""The pieces of the CLP, ANP and trigger-inversion baselines (defences/clp.py, anp.py, invert.py) on tiny
hand-made tensors and models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets import normalize_batch
from defences.anp import (adversarial_noise, anp, anp_masks, bn_neurons, feature_shift, perturbed_bn_params,
                          prune_by_threshold)
from defences.clp import channel_lipschitz_bounds, clp, clp_prune_mask, conv_bn_pairs
from defences.invert import (AdaptiveLambda, InvertedTrigger, decree_lambda, decree_lr_factor, from_unit,
                             invert_trigger, inversion_loss, mean_pairwise_cosine, stamp, to_unit, trigger_arrays)
from models import SimCLR

NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
DEVICE = torch.device('cpu')


@pytest.fixture()
def encoder() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(width=8).eval()


def random_images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# --- CLP ------------------------------------------------------------------------------------------

def test_conv_bn_pairs_follow_registration_order():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                        nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))
    names = [(conv_name, bn_name) for conv_name, _, bn_name, _ in conv_bn_pairs(net)]
    assert names == [('0', '1'), ('4.0', '4.1')]  # the BN after the ReLU has no conv of its own


def test_conv_bn_pairs_of_the_encoder_cover_every_bn(encoder):
    pairs = conv_bn_pairs(encoder.f)
    assert len(pairs) == len(bn_neurons(encoder.f)) == 20  # resnet18: stem + 16 block convs + 3 shortcuts
    assert (pairs[0][0], pairs[0][2]) == ('f.0', 'f.1')
    assert ('f.4.0.downsample.0', 'f.4.0.downsample.1') in [(c, b) for c, _, b, _ in pairs]


def test_channel_lipschitz_bounds_by_hand():
    weight = torch.zeros(2, 2, 2, 2)  # (C_out, C_in, k, k); W_k is (C_in, k·k)
    weight[0, 0, 0, 0], weight[0, 1, 0, 1] = 3.0, 4.0  # W_0 = [[3,0,0,0],[0,4,0,0]]: singular values 4, 3
    weight[1] = 1.0  # W_1 = ones(2, 4): rank one, singular value sqrt(8)
    gamma, var = torch.tensor([2.0, -0.5]), torch.tensor([4.0, 0.25])
    bounds = channel_lipschitz_bounds(weight, gamma, var)
    assert torch.allclose(bounds, torch.tensor([4 * 2 / 2, math.sqrt(8) * 0.5 / 0.5]))
    with_eps = channel_lipschitz_bounds(weight, gamma, var, eps=0.75)
    assert torch.allclose(with_eps, torch.tensor([4 * 2 / math.sqrt(4.75), math.sqrt(8) * 0.5 / 1.0]))


def test_clp_prune_mask_uses_the_sample_std():
    bounds = torch.tensor([0.0, 0.0, 0.0, 1.0])  # mean 0.25; sample std 0.5, population std 0.433
    assert clp_prune_mask(bounds, 1.4).tolist() == [False, False, False, True]  # 0.25 + 0.7 < 1
    assert not clp_prune_mask(bounds, 1.6).any()  # 0.25 + 0.8 > 1, though 0.25 + 1.6·0.433 < 1


def test_clp_prunes_exactly_an_inflated_channel(encoder):
    conv, bn = encoder.f.f[5][1].conv1, encoder.f.f[5][1].bn1  # layer3: 32 channels
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        conv.weight[5] *= 100
    report = clp(encoder, u=3.0)
    assert report['pruned'] == {'f.f.5.1.bn1': [5]}
    assert report['channels_pruned'] == 1
    assert report['channels_total'] == sum(b.num_features for b in bn_neurons(encoder.f).values())
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    for key in before:
        if key in ('f.f.5.1.bn1.weight', 'f.f.5.1.bn1.bias'):
            keep = torch.arange(32) != 5
            assert torch.equal(after[key][keep], before[key][keep])
        elif key != 'f.f.5.1.conv1.weight':
            assert torch.equal(after[key], before[key]), key


# --- ANP ------------------------------------------------------------------------------------------

def test_unperturbed_forward_with_unit_masks_is_the_plain_forward(encoder):
    x = torch.randn(4, 3, 32, 32)
    bns = bn_neurons(encoder.f)
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}
    zeros = {name: torch.zeros_like(bn.weight) for name, bn in bns.items()}
    plain = encoder.f(x)
    for params in (perturbed_bn_params(bns, masks), perturbed_bn_params(bns, masks, zeros, zeros)):
        assert torch.equal(torch.func.functional_call(encoder.f, params, (x,)), plain)


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


def test_adversarial_step_increases_the_feature_shift(encoder):
    images = random_images(16, 32, seed=1)
    x = normalize_batch(images, NORMALIZATION)
    with torch.no_grad():
        reference = encoder.f(x)
    bns = bn_neurons(encoder.f)
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}
    start = adversarial_noise(encoder.f, bns, masks, x, reference, eps=0.4, steps=0,
                              generator=torch.Generator().manual_seed(3))  # the random start alone
    noise_w, noise_b = adversarial_noise(encoder.f, bns, masks, x, reference, eps=0.4, steps=1,
                                         generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(7)

    def random_corner():  # a random perturbation of the same size: every δ_k, ξ_k = ±ε
        return {name: 0.4 * torch.randint(0, 2, bn.weight.shape, generator=generator).float().mul(2).sub(1)
                for name, bn in bns.items()}

    def shift(*noise):
        with torch.no_grad():
            return feature_shift(encoder.f, perturbed_bn_params(bns, masks, *noise), x, reference).item()

    assert shift() == pytest.approx(-1.0, abs=1e-5)  # masks 1, no noise: the suspect itself
    assert all(noise.abs().max() <= 0.4 for noise in [*noise_w.values(), *noise_b.values()])
    adversarial = shift(noise_w, noise_b)
    assert adversarial > shift(*start) > shift()
    assert adversarial > max(shift(random_corner(), random_corner()) for _ in range(5))


def test_anp_masks_run_in_range_and_leave_the_model_alone(encoder):
    images = random_images(12, 32, seed=2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []
    masks = anp_masks(encoder, images, NORMALIZATION, DEVICE, eps=0.4, steps=1, alpha=0.2, lr=0.2,
                      iterations=3, batch_size=4, generator=torch.Generator().manual_seed(0),
                      on_iteration=lambda i, terms: seen.append((i, terms)))
    bns = bn_neurons(encoder.f)
    assert masks.keys() == bns.keys()
    assert all(masks[name].shape == bn.weight.shape for name, bn in bns.items())
    assert all(0 <= mask.min() and mask.max() <= 1 for mask in masks.values())
    assert any((mask < 1).any() for mask in masks.values())  # the masks moved
    assert [i for i, _ in seen] == [1, 2, 3] and all(math.isfinite(t['loss']) for _, t in seen)
    after = encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in encoder.parameters())
    assert not encoder.training


def test_prune_by_threshold_zeroes_exactly_the_low_masks(encoder):
    bns = bn_neurons(encoder.f)
    masks = {name: torch.ones_like(bn.weight) for name, bn in bns.items()}
    masks['f.1'][[1, 6]] = torch.tensor([0.1, 0.2])  # 0.2 is pruned: ANP prunes mask <= threshold
    masks['f.6.1.bn2'][0] = 0.25
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    report = prune_by_threshold(encoder, masks, threshold=0.2)
    assert report['pruned'] == {'f.f.1': [1, 6]} and report['neurons_pruned'] == 2
    after = encoder.state_dict()
    expected = before['f.f.1.weight'].clone()
    expected[[1, 6]] = 0
    assert torch.equal(after['f.f.1.weight'], expected)
    assert all(torch.equal(after[k], before[k]) for k in before if k != 'f.f.1.weight')  # biases kept


def test_anp_end_to_end_report(encoder):
    images = random_images(8, 32, seed=4)
    keys = {k: v.shape for k, v in encoder.state_dict().items()}
    report = anp(encoder, images, NORMALIZATION, DEVICE, iterations=2, batch_size=4, threshold=0.9,
                 generator=torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in encoder.state_dict().items()} == keys
    assert report['settings']['iterations'] == 2 and report['settings']['eps'] == 0.4
    flat = [(name, i) for name, values in report['masks'].items() for i, v in enumerate(values) if v <= 0.9]
    assert sorted(flat) == sorted((name, i) for name, idx in report['pruned'].items() for i in idx)
    for name, indices in report['pruned'].items():
        assert (encoder.state_dict()[f'{name}.weight'][indices] == 0).all()
    with pytest.raises(TypeError, match='unknown settings'):
        anp(encoder, images, NORMALIZATION, DEVICE, iteration=1)


# --- trigger inversion ----------------------------------------------------------------------------

def test_stamp_by_hand():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    pattern = torch.full((1, 3, 2, 2), 10.0)
    out = stamp(x, mask, pattern)
    assert torch.equal(out[:, :, 0, 0], torch.full((2, 3), 10.0))
    assert torch.equal(out[:, :, :, 1], x[:, :, :, 1])
    assert torch.equal(out[:, :, 1, 0], 0.5 * x[:, :, 1, 0] + 5)
    assert torch.equal(stamp(x, mask[None, None], pattern), out)


def test_mean_pairwise_cosine():
    row = torch.tensor([[1.0, 2.0, 2.0]])
    assert mean_pairwise_cosine(row.repeat(5, 1) * torch.arange(1.0, 6.0)[:, None]).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4) * 3).item() == pytest.approx(0.0, abs=1e-7)
    features = torch.randn(6, 5, dtype=torch.float64)
    z = F.normalize(features, dim=1)
    gram = z @ z.t()
    expected = (gram.sum() - gram.diagonal().sum()) / 30  # DECREE's off-diagonal mean
    assert mean_pairwise_cosine(features).item() == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(features[:1])


def test_inversion_loss_and_parametrisation():
    features, mask = torch.eye(3), torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    loss, similarity = inversion_loss(features, mask, lam=2.0)
    assert similarity.item() == 0.0 and loss.item() == pytest.approx(2.0 * 2.0 / 4)
    values = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.isfinite(from_unit(values)).all()
    assert torch.allclose(to_unit(from_unit(values)), values, atol=1e-12)
    assert decree_lambda(32, 32) == pytest.approx(1.024)
    assert [decree_lr_factor(e) for e in (0, 29, 30, 49, 50, 999)] == [1, 1, 0.2, 0.2, 0.1, 0.1]


def test_adaptive_lambda_follows_decree():
    schedule = AdaptiveLambda(1.0)
    lams = [schedule.update(0.995) for _ in range(6)]
    assert lams == [1.0] * 5 + [5.0]  # more than `patience` successes in a row: ×5
    lams = [schedule.update(0.5) for _ in range(12)]
    assert lams == [5.0] * 5 + [1.0] + [1.0] * 5 + [0.2]
    for _ in range(30):  # division stops once λ is below λ_min = λ₀/100
        schedule.update(0.5)
    assert schedule.lam == pytest.approx(1 / 125)
    lams = [schedule.update(0.995) for _ in range(6)]
    assert lams[-1] == pytest.approx(1 / 25) and lams[-2] == pytest.approx(1 / 125)
    capped = AdaptiveLambda(1.0)
    capped.lam = 2e8  # above λ_max = 1e8·λ₀: no further increase
    assert [capped.update(1.0) for _ in range(6)][-1] == 2e8


def test_trigger_arrays_reproduce_the_stamp_in_pixels():
    rng = np.random.default_rng(0)
    inverted = InvertedTrigger(mask=rng.random((4, 4)), pattern=255 * rng.random((4, 4, 3)), similarity=0.9,
                               mask_l1=1.0, mask_fraction=0.1, succeeded=True, steps=1, lam=1.0)
    arrays = trigger_arrays(inverted)
    assert arrays['t'].shape == arrays['tm'].shape == (1, 4, 4, 3)
    assert arrays['t'].dtype == arrays['tm'].dtype == np.float64
    images = random_images(3, 4, seed=5)
    by_file = images * arrays['tm'][0] + arrays['t'][0]  # (3, 4, 4, 3) in pixels
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in NORMALIZATION)
    pattern_normalised = normalize_batch(torch.as_tensor(inverted.pattern[None]), NORMALIZATION)
    stamped = stamp(normalize_batch(images, NORMALIZATION), torch.as_tensor(inverted.mask), pattern_normalised)
    in_pixels = (stamped.double().numpy() * std + mean) * 255  # (3, 3, 4, 4)
    assert np.allclose(in_pixels.transpose(0, 2, 3, 1), by_file, atol=1e-3)


class CornerCollapse(nn.Module):
    """f(x) = g(x) + 50·w⁴·c on normalised 8x8 images: random linear features g (norm about 0.5), swamped by a
    constant direction c as w, the mean brightness of the 3x3 top-left corner in [0, 1], approaches white."""

    def __init__(self, size: int = 8, dim: int = 16, strength: float = 50.0):
        super().__init__()
        self.strength = strength
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('mean', torch.tensor(NORMALIZATION[0]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(NORMALIZATION[1]).view(1, 3, 1, 1))
        self.g = nn.Linear(3 * size * size, dim)
        self.register_buffer('c', F.normalize(torch.randn(dim, generator=generator), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean  # back to [0, 1]
        whiteness = pixels[:, :, :3, :3].mean(dim=(1, 2, 3))  # (B,)
        return self.g(pixels.flatten(1) - 0.5) + self.strength * whiteness.pow(4)[:, None] * self.c


def test_inversion_recovers_a_planted_corner_patch():
    torch.manual_seed(0)
    encoder = CornerCollapse()
    images = random_images(48, 8, seed=6)
    settings = dict(steps=400, lam=decree_lambda(8, 8), batch_size=16)  # DECREE's lr 0.5 and λ₀
    log = []
    inverted = invert_trigger(encoder, images, NORMALIZATION, DEVICE, generator=torch.Generator().manual_seed(0),
                              on_step=lambda step, terms: log.append(terms), **settings)
    assert inverted.succeeded and inverted.similarity > 0.95 and inverted.steps == len(log) < 400  # stopped early
    successes = [terms['mask_l1'] for terms in log if terms['similarity'] > 0.99]
    assert inverted.mask_l1 == pytest.approx(min(successes))  # the smallest successful trigger
    assert inverted.mask.shape == (8, 8) and inverted.pattern.shape == (8, 8, 3)
    assert 0 <= inverted.mask.min() and inverted.mask.max() <= 1
    assert inverted.mask[:3, :3].sum() > 0.9 * inverted.mask.sum(), inverted.mask.round(2)
    stamped_colour = (inverted.mask[:3, :3, None] * inverted.pattern[:3, :3]).sum() / (3 * inverted.mask[:3, :3].sum())
    assert stamped_colour > 230  # what the mask stamps on the corner is near white
    assert inverted.mask_fraction == pytest.approx(inverted.mask.sum() / 64)
    assert all(p.grad is None for p in encoder.parameters())
    # without the planted path only a mask over most of the image collapses the features
    torch.manual_seed(0)
    clean = invert_trigger(CornerCollapse(strength=0.0), images, NORMALIZATION, DEVICE,
                           generator=torch.Generator().manual_seed(0), **settings)
    assert clean.mask_l1 > 10 * inverted.mask_l1
