"""Stage 3 with several encoders: their probes trained together as one stacked model (models/probe_group.py), each
exactly as its single run on this CPU, within 0.5 points wherever the batched products round otherwise."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import training_downstream_classifier as stage3
from conftest import run_in_process
from models import MLPProbe, ProbeGroup, SimCLR, load_checkpoint, save_atomic
from models.checkpoint import encoder_checkpoint
from models.probe_group import split_optimizer_state, stack_optimizer_states


def test_a_group_of_probes_computes_each_probe_and_its_dropout():
    torch.manual_seed(0)
    probes = [MLPProbe(6, (5, 4), 3) for _ in range(2)]
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    group = ProbeGroup(probes, generators)
    x = torch.randn(2, 7, 6)
    group.eval()
    expected = torch.stack([probe.eval()(x[k]) for k, probe in enumerate(probes)])
    assert torch.allclose(group(x), expected, atol=1e-6)
    group.train()
    out = group(x)
    for k, probe in enumerate(probes):  # F.dropout's mask, drawn from probe k's generator
        torch.manual_seed(k + 1)
        assert torch.allclose(out[k], probe.train()(x[k]), atol=1e-6)
    assert group.probe_state(1)['fc2.weight'].shape == (4, 5)
    group.load_probe_state(0, probes[1].state_dict())
    assert torch.equal(group.probe_state(0)['fc3.bias'], probes[1].fc3.bias)


def test_optimizer_states_split_and_stack_back():
    # index 0 is fc1.weight, stored transposed in the group: (N, in, out) = (2, 3, 2); index 1 is fc1.bias (N, out)
    state = {'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.arange(12.).view(2, 3, 2)},
                       1: {'step': torch.tensor(3.0), 'exp_avg': torch.arange(4.).view(2, 2)}},
             'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}
    parts = [split_optimizer_state(state, k) for k in (0, 1)]
    assert parts[1]['state'][0]['exp_avg'].tolist() == [[6.0, 8.0, 10.0], [7.0, 9.0, 11.0]]  # MLPProbe's (out, in)
    assert parts[1]['state'][0]['exp_avg'].is_contiguous() and parts[1]['state'][0]['step'] == 3
    assert parts[1]['state'][1]['exp_avg'].tolist() == [2.0, 3.0]
    stacked = stack_optimizer_states(parts)['state']
    assert torch.equal(stacked[0]['exp_avg'], state['state'][0]['exp_avg'])
    assert torch.equal(stacked[1]['exp_avg'], state['state'][1]['exp_avg'])


@pytest.fixture(scope='module')
def three_encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp('encoders')
    paths = []
    for seed, name in enumerate(('clean', 'backdoored', 'mimic')):
        torch.manual_seed(seed)
        path = folder / name / 'model_1.pth'
        save_atomic(encoder_checkpoint(SimCLR(width=8), None, 1), path)
        paths.append(str(path))
    return paths


def group_args(data_root, trigger_file, reference_file, *extra):
    return ['--dataset', 'synthetic_digits', '--data_root', str(data_root), '--trigger_file', str(trigger_file),
            '--reference_file', str(reference_file), '--encoder_usage_info', 'synthetic_shapes', '--device', 'cpu',
            '--no_progress', '--lr', '0.001', *extra]


def metric_values(stdout: str) -> dict:
    """{(encoder or None, metric, epoch): value} of the JSON metric lines."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"metric"')]
    return {(line.get('encoder'), line['metric'], line['epoch']): line['value'] for line in lines}


def batched_products_round_as_single_ones() -> bool:
    """Whether this platform's batched matrix products give the single ones' bits (forward and weight gradient)."""
    torch.manual_seed(0)
    x, weight, grad = torch.randn(2, 64, 64), torch.randn(2, 512, 64, requires_grad=True), torch.randn(2, 64, 512)
    batched = torch.baddbmm(torch.zeros(2, 1, 512), x, weight.transpose(1, 2))
    batched.backward(grad)
    single = weight[1].detach().clone().requires_grad_()
    out = F.linear(x[1], single, torch.zeros(512))
    out.backward(grad[1])
    return torch.equal(out, batched[1]) and torch.equal(single.grad, weight.grad[1])


def test_each_probe_of_a_group_is_its_single_run(data_root, trigger_file, reference_file, three_encoders, tmp_path):
    epochs = '20'
    group = run_in_process('training_downstream_classifier.py',
                           *group_args(data_root, trigger_file, reference_file, '--nn_epochs', epochs),
                           '--encoder', *three_encoders, '--results_dir', str(tmp_path / 'group'))
    assert group.returncode == 0, group.stderr
    grouped = metric_values(group.stdout)
    exact = batched_products_round_as_single_ones()
    for path, name in zip(three_encoders, ('clean', 'backdoored', 'mimic')):
        single = run_in_process('training_downstream_classifier.py',
                                *group_args(data_root, trigger_file, reference_file, '--nn_epochs', epochs),
                                '--encoder', path, '--results_dir', str(tmp_path / f'single_{name}'))
        assert single.returncode == 0, single.stderr
        alone = metric_values(single.stdout)
        assert len(alone) == 3 * 20
        for (_, metric, epoch), value in alone.items():
            assert abs(grouped[(name, metric, epoch)] - value) <= 0.5
            if exact:
                assert grouped[(name, metric, epoch)] == value, (name, metric, epoch)
        ours = json.loads((tmp_path / 'group' / name / 'metrics.json').read_text())
        theirs = json.loads((tmp_path / f'single_{name}' / 'metrics.json').read_text())
        assert ours.keys() == theirs.keys() and ours['encoder'] == path
        assert set(json.loads((tmp_path / 'group' / name / 'args.json').read_text())) == \
            set(json.loads((tmp_path / f'single_{name}' / 'args.json').read_text()))
        if exact:
            assert ours == theirs
            saved, alone_saved = (load_checkpoint(folder / 'probe_20.pth')['state_dict']
                                  for folder in (tmp_path / 'group' / name, tmp_path / f'single_{name}'))
            assert all(torch.equal(saved[key], alone_saved[key]) for key in alone_saved)


def test_a_resumed_group_equals_an_uninterrupted_one(data_root, trigger_file, reference_file, three_encoders,
                                                      tmp_path):
    common = group_args(data_root, trigger_file, reference_file, '--save_freq', '2', '--encoder', *three_encoders,
                        '--names', 'a', 'b', 'c')
    assert run_in_process('training_downstream_classifier.py', *common, '--nn_epochs', '4',
                          '--results_dir', str(tmp_path / 'straight')).returncode == 0
    assert run_in_process('training_downstream_classifier.py', *common, '--nn_epochs', '2',
                          '--results_dir', str(tmp_path / 'stopped')).returncode == 0
    resumed = run_in_process('training_downstream_classifier.py', *common, '--nn_epochs', '4',
                             '--results_dir', str(tmp_path / 'stopped'), '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming 3 probes' in resumed.stdout
    for name in 'abc':
        straight, stopped = (load_checkpoint(tmp_path / run / name / 'probe_4.pth') for run in ('straight', 'stopped'))
        assert all(torch.equal(straight['state_dict'][key], stopped['state_dict'][key]) for key in straight['state_dict'])
        assert straight['metrics'] == stopped['metrics']
        assert json.loads((tmp_path / 'straight' / name / 'metrics.json').read_text()) == \
            json.loads((tmp_path / 'stopped' / name / 'metrics.json').read_text())


def test_a_bad_member_is_one_line_naming_it_and_nothing_is_written(data_root, trigger_file, reference_file,
                                                                   three_encoders, tmp_path):
    missing = str(tmp_path / 'nowhere' / 'model_1.pth')
    result = run_in_process('training_downstream_classifier.py',
                            *group_args(data_root, trigger_file, reference_file, '--nn_epochs', '1'),
                            '--encoder', three_encoders[0], missing, '--results_dir', str(tmp_path / 'out'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: encoder nowhere:') and missing in lines[0]
    assert not (tmp_path / 'out').exists()
    same_folder = run_in_process('training_downstream_classifier.py',
                                 *group_args(data_root, trigger_file, reference_file, '--nn_epochs', '1'),
                                 '--encoder', three_encoders[0], three_encoders[0],
                                 '--results_dir', str(tmp_path / 'out'))
    assert same_folder.returncode == 2 and "--names: 'clean' names more than one encoder" in same_folder.stderr
    assert not (tmp_path / 'out').exists()


def test_encoders_of_other_widths_are_probed_in_one_run(data_root, trigger_file, reference_file, three_encoders,
                                                        tmp_path):
    torch.manual_seed(5)
    wide = tmp_path / 'wide' / 'model_1.pth'
    save_atomic(encoder_checkpoint(SimCLR(width=16), None, 1), wide)
    args = group_args(data_root, trigger_file, reference_file, '--nn_epochs', '2')
    both = run_in_process('training_downstream_classifier.py', *args, '--encoder', three_encoders[0], str(wide),
                          '--results_dir', str(tmp_path / 'both'))
    assert both.returncode == 0, both.stderr
    alone = run_in_process('training_downstream_classifier.py', *args, '--encoder', str(wide),
                           '--results_dir', str(tmp_path / 'alone'))
    ours, theirs = (json.loads((tmp_path / run / 'metrics.json').read_text())
                    for run in ('both/wide', 'alone'))
    assert abs(ours['acc'] - theirs['acc']) <= 0.5 and (tmp_path / 'both' / 'clean' / 'metrics.json').is_file()
