"""Trigger inversion (defences/invert.py, DECREE's): the stamp, the loss, the adaptive lambda, the verdict, a planted trigger recovered, and the script's inverted trigger."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baseline_defence
from datasets import normalize_batch
from defences.invert import (AdaptiveLambda, InvertedTrigger, decree_lambda, decree_lr_factor, detection, from_unit,
                             invert_trigger, inversion_loss, mean_pairwise_cosine, stamp, to_unit, trigger_arrays)
from models import load_encoder
from conftest import CornerCollapse
from defence_helpers import CIFAR_NORMALIZATION, DEVICE, images, random_images, tiny_args


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
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in CIFAR_NORMALIZATION)
    pattern_normalised = normalize_batch(torch.as_tensor(inverted.pattern[None]), CIFAR_NORMALIZATION)
    stamped = stamp(normalize_batch(images, CIFAR_NORMALIZATION), torch.as_tensor(inverted.mask), pattern_normalised)
    in_pixels = (stamped.double().numpy() * std + mean) * 255  # (3, 3, 4, 4)
    assert np.allclose(in_pixels.transpose(0, 2, 3, 1), by_file, atol=1e-3)


def test_inversion_recovers_a_planted_corner_patch():
    torch.manual_seed(0)
    encoder = CornerCollapse(8, 50.0, normalization=CIFAR_NORMALIZATION)
    images = random_images(48, 8, seed=6)
    settings = dict(steps=400, lam=decree_lambda(8, 8), batch_size=16)  # DECREE's lr 0.5 and λ₀
    log = []
    inverted = invert_trigger(encoder, images, CIFAR_NORMALIZATION, DEVICE, generator=torch.Generator().manual_seed(0),
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
    clean = invert_trigger(CornerCollapse(8, 0.0, normalization=CIFAR_NORMALIZATION), images, CIFAR_NORMALIZATION, DEVICE,
                           generator=torch.Generator().manual_seed(0), **settings)
    assert clean.mask_l1 > 10 * inverted.mask_l1


def test_decree_verdict_by_hand():
    assert detection(10.0, 10, 10) == {'l1_norm': 10.0, 'pl1_norm': 0.1, 'threshold': 0.1, 'detected': False}
    assert detection(9.9, 10, 10)['detected'] and not detection(25.0, 10, 10, threshold=0.2)['detected']
    assert detection(263.0, 32, 32)['pl1_norm'] == pytest.approx(263 / 1024)  # the demo's 26%: not detected


def test_invert_writes_a_loadable_trigger_and_resumes(data_root, tiny_encoder, tmp_path):
    from datasets import apply_trigger, load_trigger
    out = tmp_path / 'invert'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--epochs', 2, '--save_freq', 1,
                                    defence='invert'))
    report = json.loads((out / 'defence.json').read_text())
    trigger = load_trigger(out / report['trigger_file'], image_size=32)
    assert report['mask_l1'] == pytest.approx(float((1 - trigger.mask[0, ..., 0]).sum()), rel=1e-4)
    assert apply_trigger(images(2), trigger).dtype == np.uint8
    (out / 'model_2.pth').unlink()
    (out / 'defence.json').unlink()
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--epochs', 2, '--save_freq', 1,
                                    '--resume', defence='invert'))
    again = json.loads((out / 'defence.json').read_text())
    assert again['mask_l1'] == report['mask_l1'] and again['resumed']  # the inversion is not repeated


def test_invert_if_detected_keeps_an_undetected_suspect(data_root, tiny_encoder, tmp_path):
    """Two inversion steps leave a mask over about half the image: DECREE detects nothing, and with
    --invert_unlearn if_detected the suspect itself is the purified encoder."""
    out = tmp_path / 'invert'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--invert_unlearn', 'if_detected',
                                    defence='invert'))
    report = json.loads((out / 'defence.json').read_text())
    assert not report['detection']['detected'] and not report['unlearned'] and report['epochs'] == 0
    assert report['detection']['pl1_norm'] == pytest.approx(report['mask_l1'] / 32 ** 2)
    model, _ = load_encoder(out / report['checkpoint'])
    suspect, _ = load_encoder(tiny_encoder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), suspect.state_dict().values()))
