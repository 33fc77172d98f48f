"""CLP (defences/clp.py): the channel Lipschitz bounds and z-scores by hand, the pruning, and the data-free script."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import baseline_defence
from core.errors import UsageError
from defences.anp import bn_neurons
from defences.clp import channel_lipschitz_bounds, clp, clp_prune_mask, conv_bn_pairs, largest_possible_z, max_z_score
from models import SimCLR
from models.checkpoint import load_checkpoint
from conftest import run_in_process
from defence_helpers import tiny_args
from defence_helpers import encoder  # noqa: F401  (fixtures)


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


def test_clp_script_prunes_a_planted_high_lipschitz_channel(data_root, tmp_path):
    from models import save_atomic
    from models.checkpoint import encoder_checkpoint
    torch.manual_seed(3)
    model = SimCLR(width=8)
    with torch.no_grad():
        model.f.f[5][0].conv2.weight[7] *= 100  # layer3, block 0, output channel 7 of conv2 -> bn2
    suspect = tmp_path / 'planted.pth'
    save_atomic(encoder_checkpoint(model, None, 1), suspect)
    out = tmp_path / 'clp'
    result = run_in_process('baseline_defence.py', *tiny_args(data_root, suspect, out, defence='clp'))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / 'defence.json').read_text())
    assert report['pruned']['f.f.5.0.bn2'] == [7] and report['checkpoint'] == 'model_0.pth'
    state = load_checkpoint(out / 'model_0.pth')['state_dict']
    assert state['f.f.5.0.bn2.weight'][7] == 0 and state['f.f.5.0.bn2.bias'][7] == 0


@pytest.mark.parametrize('data', ['fewer_than_a_batch', 'none'])
def test_clp_reads_no_image_and_checks_no_data_size(tmp_path, tiny_encoder, data):
    """A pre-training split of 10 images (under one batch of 128 at any --ratio), or no data folder at all."""
    from conftest import write_split
    from datasets.synthetic import make_synthetic
    root = tmp_path / 'data'
    if data == 'fewer_than_a_batch':
        write_split(root / 'synthetic_shapes', 'train', *make_synthetic('synthetic_shapes', 10, seed=1))
    out = tmp_path / 'clp'
    baseline_defence.main(['--defence', 'clp', '--teacher', str(tiny_encoder), '--pretraining_dataset',
                           'synthetic_shapes', '--data_root', str(root), '--ratio', '0.04', '--results_dir', str(out),
                           '--device', 'cpu', '--no_progress'])
    report = json.loads((out / 'defence.json').read_text())
    assert report['images'] == 0 and (out / 'model_0.pth').exists()
    if data == 'none':
        return
    with pytest.raises(UsageError, match='fewer|batch|images'):  # a defence that reads D still checks its size
        baseline_defence.main(['--defence', 'ft', '--teacher', str(tiny_encoder), '--pretraining_dataset',
                               'synthetic_shapes', '--data_root', str(root), '--ratio', '0.04',
                               '--results_dir', str(tmp_path / 'ft'), '--device', 'cpu', '--no_progress'])
