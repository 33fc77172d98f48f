"""The pieces of the CLP, ANP, Fine-Pruning, trigger-inversion and SSL-Cleanse baselines (defences/clp.py, anp.py,
fp.py, invert.py, sslcleanse.py) on tiny hand-made tensors and models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets import normalize_batch
from models.losses import nt_xent
from defences.anp import (adversarial_noise, anp, anp_masks, bn_neurons, contrastive_loss, perturbed_bn_params,
                          prune_by_threshold, signed_ascent)
from defences.clp import (channel_lipschitz_bounds, clp, clp_prune_mask, conv_bn_pairs, largest_possible_z,
                          max_z_score)
from defences.fp import agreement, lowest_channels, prune_until_agreement_drops
from defences.invert import (AdaptiveLambda, InvertedTrigger, decree_lambda, decree_lr_factor, detection, from_unit,
                             invert_trigger, inversion_loss, mean_pairwise_cosine, stamp, to_unit, trigger_arrays)
from defences.sslcleanse import lr_factor, norm_mse, sslcleanse_loss
from models import SimCLR
from conftest import CornerCollapse

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
    assert len(pairs) == len(bn_neurons(encoder)) == 20  # resnet18: stem + 16 block convs + 3 shortcuts
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


def test_max_z_score_and_its_bound():
    bounds = torch.tensor([1.0, 1.0, 1.0, 5.0])  # mean 2, sample std 2: z = 3/2 = (4 − 1)/√4
    assert max_z_score(bounds) == pytest.approx(1.5) == largest_possible_z(4)
    assert max_z_score(torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(1.0)  # mean 1, sample std 1
    assert max_z_score(torch.ones(5)) == 0.0  # nothing stands out
    assert largest_possible_z(8) == pytest.approx(7 / math.sqrt(8))  # 2.47: width 8's stem and layer1
    assert largest_possible_z(10) < 3 < largest_possible_z(11)  # CLP's u = 3 needs 11 channels
    for n in (3, 8, 16):  # no layer of n channels exceeds the bound, whatever its values
        values = torch.randn(200, n, generator=torch.Generator().manual_seed(n)).pow(3)
        assert max(max_z_score(row) for row in values) <= largest_possible_z(n) + 1e-5


def test_clp_prunes_exactly_an_inflated_channel(encoder):
    conv, bn = encoder.f.f[5][1].conv1, encoder.f.f[5][1].bn1  # layer3: 32 channels
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        conv.weight[5] *= 100
    report = clp(encoder, u=3.0)
    assert report['pruned'] == {'f.f.5.1.bn1': [5]}
    assert report['channels_pruned'] == 1
    assert report['channels_total'] == sum(b.num_features for b in bn_neurons(encoder).values())
    assert report['max_z'].keys() == bn_neurons(encoder).keys()
    assert report['max_z']['f.f.5.1.bn1'] == pytest.approx(largest_possible_z(32), rel=0.05)  # one outlier of 32
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
        masks = anp_masks(encoder, images, NORMALIZATION, DEVICE, eps=0.4, steps=1, alpha=0.2, lr=0.2,
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
    report = anp(encoder, images, NORMALIZATION, DEVICE, iterations=2, batch_size=4, threshold=0.9,
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
        anp(encoder, images, NORMALIZATION, DEVICE, iteration=1)


# --- Fine-Pruning's stopping rule -----------------------------------------------------------------

def test_lowest_channels_and_agreement_by_hand():
    assert lowest_channels(torch.tensor([0.5, 0.0, 0.2, 0.0]), 3).tolist() == [False, True, True, True]
    assert not lowest_channels(torch.tensor([1.0, 2.0]), 0).any()
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert agreement(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_prune_until_agreement_drops_keeps_the_last_step_above_the_bound(encoder):
    """Channels pruned one at a time (64 channels, steps of ⌈1%⌉ = 1) until the features' cosine to the
    suspect's falls below the bound; the curve is monotone enough here that a looser bound prunes more."""
    from defences.fp import last_stage_inputs
    stage_inputs, activation = last_stage_inputs(encoder, random_images(16, 32, seed=3), NORMALIZATION, DEVICE)
    mask, curve = prune_until_agreement_drops(encoder, stage_inputs, activation, min_cosine=0.95)
    kept = int(mask.sum())
    assert list(curve) == list(range(1, len(curve) + 1))  # one channel per step
    assert all(curve[count] >= 0.95 for count in range(1, kept + 1))
    assert kept == len(curve) - 1 and curve[kept + 1] < 0.95  # the first step below the bound stopped it
    assert torch.equal(mask, lowest_channels(activation, kept))
    looser, _ = prune_until_agreement_drops(encoder, stage_inputs, activation, min_cosine=0.5)
    assert looser.sum() >= kept
    none, _ = prune_until_agreement_drops(encoder, stage_inputs, activation, min_cosine=1.01)
    assert not none.any()


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


def test_inversion_recovers_a_planted_corner_patch():
    torch.manual_seed(0)
    encoder = CornerCollapse(8, 50.0, normalization=NORMALIZATION)
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
    clean = invert_trigger(CornerCollapse(8, 0.0, normalization=NORMALIZATION), images, NORMALIZATION, DEVICE,
                           generator=torch.Generator().manual_seed(0), **settings)
    assert clean.mask_l1 > 10 * inverted.mask_l1


def test_decree_verdict_by_hand():
    assert detection(10.0, 10, 10) == {'l1_norm': 10.0, 'pl1_norm': 0.1, 'threshold': 0.1, 'detected': False}
    assert detection(9.9, 10, 10)['detected'] and not detection(25.0, 10, 10, threshold=0.2)['detected']
    assert detection(263.0, 32, 32)['pl1_norm'] == pytest.approx(263 / 1024)  # the demo's 26%: not detected


# --- SSL-Cleanse ----------------------------------------------------------------------------------

def test_norm_mse_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert norm_mse(a, 2 * a).item() == pytest.approx(0.0, abs=1e-7)
    assert norm_mse(a, -a).item() == pytest.approx(4.0)
    assert norm_mse(a, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item() == pytest.approx(1.0)  # cos 0 and 1


def test_sslcleanse_loss_by_hand():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, terms = sslcleanse_loss(e1, e1, (e1, e2), (e2, e2))  # clean pair agrees; trigger: f differs, g agrees
    assert terms['loss_clean'].item() == pytest.approx(0.0, abs=1e-7)
    assert terms['loss_trigger'].item() == pytest.approx((2 + 0) / 6)
    assert loss.item() == pytest.approx(2 / 6)
    loss, terms = sslcleanse_loss(e1, e2, (e1, e1), (e1, e1), clean_weight=0.5, trigger_weight=3.0)
    assert terms['loss_clean'].item() == pytest.approx(2 * 2 / 6) and loss.item() == pytest.approx(0.5 * 4 / 6)


def test_sslcleanse_lr_factor_follows_the_code():
    assert lr_factor(0, 0, 500) == pytest.approx(1 / 500) and lr_factor(499, 3, 500) == 1.0  # warm-up
    assert [lr_factor(10_000, epoch, 500) for epoch in (449, 450, 474, 475)] == \
        pytest.approx([1.0, 0.2, 0.2, 0.04])  # ×0.2 for the last 50 epochs, again for the last 25
    assert [lr_factor(10_000, epoch, 40) for epoch in (14, 15, 39)] == pytest.approx([1.0, 0.2, 0.2])  # 40 − 50 < 0
    assert lr_factor(0, 0, 10, warmup_steps=0) == 1.0
