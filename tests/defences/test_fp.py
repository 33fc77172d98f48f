"""Fine-Pruning (defences/fp.py): its pieces by hand, its pruning, and its run resumed."""
from __future__ import annotations

import json
import math

import pytest
import torch

import baseline_defence
from defences import fp
from defences.fp import agreement, lowest_channels, prune_until_agreement_drops
from models import SimCLR
from models.checkpoint import load_checkpoint
from defence_helpers import CIFAR_NORMALIZATION, DEVICE, SHAPES_NORMALIZATION, images, random_images, tiny_args
from defence_helpers import encoder  # noqa: F401  (fixtures)


def test_least_active_channels_are_exactly_the_lowest_ones():
    activation = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 2.0, 0.0, 0.7, 0.2, 1.0])
    mask = fp.least_active_channels(activation, 0.3)  # 3 of 10: 0.0 (6), then the tie 0.1 at 1 and 3
    assert mask.tolist() == [False, True, False, True, False, False, True, False, False, False]
    assert not fp.least_active_channels(activation, 0.0).any()


def test_mean_channel_activation_is_the_mean_of_the_last_stage():
    torch.manual_seed(0)
    model = SimCLR(width=8).eval()
    data = images(10)
    activation = fp.mean_channel_activation(model, data, SHAPES_NORMALIZATION, torch.device('cpu'), batch_size=4)
    from datasets import normalize_batch
    with torch.no_grad():
        _, taps = model.f.forward_with_taps(normalize_batch(data, SHAPES_NORMALIZATION, torch.device('cpu')))
    assert torch.allclose(activation, taps[-1].mean(dim=(0, 2, 3)), atol=1e-6)


def test_pruned_channels_of_the_last_stage_output_exactly_zero():
    torch.manual_seed(0)
    model = SimCLR(width=8).eval()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 5, 17, 63]] = True
    fp.prune_channels(model.f.f[fp.LAST_STAGE], mask)
    with torch.no_grad():
        _, taps = model.f.forward_with_taps(torch.randn(4, 3, 32, 32))
    assert (taps[-1][:, mask] == 0).all()  # the residual stream itself, not only one branch
    assert (taps[-1][:, ~mask] != 0).any(dim=(0, 2, 3)).sum() > 50
    names = [name for name, _ in fp.residual_stream_batchnorms(model.f.f[fp.LAST_STAGE])]
    assert names == ['0.bn2', '0.downsample.1', '1.bn2']


def test_lowest_channels_and_agreement_by_hand():
    assert lowest_channels(torch.tensor([0.5, 0.0, 0.2, 0.0]), 3).tolist() == [False, True, True, True]
    assert not lowest_channels(torch.tensor([1.0, 2.0]), 0).any()
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert agreement(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_prune_until_agreement_drops_keeps_the_last_step_above_the_bound(encoder):
    """Channels pruned one at a time (64 channels, steps of ⌈1%⌉ = 1) until the features' cosine to the
    suspect's falls below the bound; the curve is monotone enough here that a looser bound prunes more."""
    from defences.fp import last_stage_inputs
    stage_inputs, activation = last_stage_inputs(encoder, random_images(16, 32, seed=3), CIFAR_NORMALIZATION, DEVICE)
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


def test_fp_resume_is_bit_identical_and_keeps_the_mask(data_root, tiny_encoder, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, straight, '--epochs', 2, '--save_freq', 1, defence='fp'))
    baseline_defence.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 1, '--save_freq', 1, defence='fp'))
    baseline_defence.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 2, '--save_freq', 1, '--resume',
                                    defence='fp'))
    a, b = load_checkpoint(straight / 'model_2.pth'), load_checkpoint(resumed / 'model_2.pth')
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    assert torch.equal(a['prune_mask'], b['prune_mask'])
    pruned = json.loads((straight / 'defence.json').read_text())['pruned']['f.f.6']
    for name in ('f.f.6.0.bn2', 'f.f.6.0.downsample.1', 'f.f.6.1.bn2'):  # still pruned after fine-tuning
        assert (a['state_dict'][f'{name}.weight'][pruned] == 0).all() and (a['state_dict'][f'{name}.bias'][pruned] == 0).all()
