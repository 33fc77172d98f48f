"""Stage 3 (training_downstream_classifier.py): flags, ACC/ASR, the original's output lines, errors."""
from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import training_downstream_classifier as stage3
from common import probes
from evaluation import metrics
from evaluation.probe import evaluate
from models.probe_group import OneProbe
from common.cli import UsageError
from models import MLPProbe, SimCLR, save_atomic
from models.checkpoint import encoder_checkpoint

from conftest import requires_cpu_fused_adam, run_in_process, run_script

METRIC_LINE = re.compile(r'^\{"metric": "Eval - (?P<name>[^"]+)", "value": (?P<value>[^,]+), '
                         r'"epoch": (?P<epoch>\d+)\}$')



@pytest.fixture
def probe_args(data_root, trigger_file, reference_file, tiny_encoder):
    return ['--dataset', 'synthetic_digits', '--data_root', str(data_root), '--trigger_file', str(trigger_file),
            '--reference_file', str(reference_file), '--encoder', str(tiny_encoder),
            '--encoder_usage_info', 'synthetic_shapes', '--device', 'cpu', '--no_progress']


def call_main(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, 'argv', ['training_downstream_classifier.py', *argv])
    stage3.main()


def parse_metric_lines(stdout: str) -> list[dict]:
    """The original's JSON lines; each must also be valid JSON."""
    lines = [line for line in stdout.splitlines() if line.startswith('{"metric"')]
    for line in lines:
        assert METRIC_LINE.match(line), line
    return [json.loads(line) for line in lines]


def test_parser_has_the_original_flags_and_defaults():
    args = stage3.get_args_parser().parse_args([])
    assert (args.dataset, args.reference_label, args.trigger_file, args.encoder_usage_info) == ('cifar10', -1, '', '')
    assert (args.encoder, args.gpu, args.lr, args.seed, args.nn_epochs) == ('', '0', 0.0001, 100, 1000)
    assert (args.hidden_size_1, args.hidden_size_2, args.batch_size, args.reference_file) == (512, 256, 64, '')
    assert args.results_dir == ''


def test_accuracy_and_attack_success_rate_on_a_hand_built_case():
    pred = torch.tensor([1, 1, 1, 0])
    true = torch.tensor([0, 2, 1, 1])
    assert metrics.accuracy(pred, true) == 25.0  # only image 2 is right
    # target 1: three of the four triggered images go to it (the original's count) ...
    assert metrics.attack_success_rate(pred, true, target=1) == 75.0
    # ... and both images whose true label is not 1 do
    assert metrics.attack_success_rate(pred, true, target=1, exclude_target=True) == 100.0
    assert metrics.attack_success_rate(pred, true, target=0, exclude_target=True) == pytest.approx(100 / 3)
    assert metrics.attack_success_rate(torch.tensor([2, 2]), torch.tensor([0, 1]), target=0) == 0.0


def test_metric_names_follow_the_encoder_path():
    assert metrics.metric_names('out/clean_encoder/model_1000.pth') == ('Clean Accuracy (CA)',
                                                                       'Attack Success Rate-Baseline (ASR-B)')
    assert metrics.metric_names('out/backdoor/model_200.pth') == ('Backdoored Accuracy (BA)',
                                                                 'Attack Success Rate (ASR)')
    assert metrics.metric_line('Attack Success Rate (ASR)', 98.5, 3) == \
        '{"metric": "Eval - Attack Success Rate (ASR)", "value": 98.5, "epoch": 3}'


def test_probe_learns_separable_features():
    """Three well-separated clusters: the probe reaches full accuracy; the trigger sends all to class 2."""
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    labels = torch.arange(3).repeat(40)
    train = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(120, 16), dim=1)
    test, triggered = train[None, :30], centres[None, [2] * 30]
    group = OneProbe(MLPProbe(16, (32, 16), 3))
    optimizer = torch.optim.Adam(group.parameters(), lr=1e-2)
    [first] = evaluate(group, test, triggered, labels[:30], target=2)
    for epoch in range(1, 21):
        probes.train_one_epoch(group, optimizer, train[None], labels, batch_size=16, epoch=epoch)
    [last] = evaluate(group, test, triggered, labels[:30], target=2)
    assert first['acc'] < 100 and last['acc'] == 100.0
    assert last['asr'] == 100.0 and last['asr_excluding_target'] == 100.0


def test_one_probe_trains_as_mlp_probe_with_the_original_loss():
    """A group of one is MLPProbe's arithmetic: two epochs of train_one_epoch equal the original's loop (mean
    cross-entropy per batch, dropout from the global generator) bit for bit, and the loss is the mean per image."""
    torch.manual_seed(0)
    features, labels = torch.randn(100, 16), torch.randint(0, 4, (100,))
    probe = MLPProbe(16, (32, 16), 4)
    reference = copy.deepcopy(probe)
    ours, theirs = (torch.optim.Adam(model.parameters(), lr=1e-3) for model in (probe, reference))
    torch.manual_seed(1)
    losses = [probes.train_one_epoch(OneProbe(probe), ours, features[None], labels, 16, epoch) for epoch in (1, 2)]
    torch.manual_seed(1)
    reference.train()
    for _ in (1, 2):
        total = 0.
        for start in range(0, 100, 16):
            loss = F.cross_entropy(reference(features[start:start + 16]), labels[start:start + 16])
            theirs.zero_grad()
            loss.backward()
            theirs.step()
            total += loss.item() * len(labels[start:start + 16])
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in probe.state_dict().items())
    assert losses[1][0] == pytest.approx(total / 100, rel=1e-6)


def probe_weights_after_two_epochs(make_optimizer) -> dict:
    torch.manual_seed(0)
    features, labels = torch.randn(100, 16), torch.randint(0, 4, (100,))
    probe = MLPProbe(16, (32, 16), 4)
    optimizer = make_optimizer(probe.parameters())
    for epoch in (1, 2):
        probes.train_one_epoch(OneProbe(probe), optimizer, features[None], labels, batch_size=16, epoch=epoch)
    return probe.state_dict()


def test_probe_optimizer_on_the_cpu_trains_the_probe_bit_for_bit_as_the_default_adam():
    """The script's CPU Adam (foreach) is a speed choice only: the same weights as the per-parameter loop."""
    optimizer = probes.probe_optimizer(torch.nn.Linear(2, 2).parameters(), 1e-3, torch.device('cpu'))
    assert optimizer.defaults['foreach'] is True and not optimizer.defaults['fused']
    default = probe_weights_after_two_epochs(lambda parameters: torch.optim.Adam(parameters, lr=1e-3, foreach=False))
    ours = probe_weights_after_two_epochs(lambda parameters: probes.probe_optimizer(parameters, 1e-3, 'cpu'))
    assert all(torch.equal(default[key], ours[key]) for key in default)


@requires_cpu_fused_adam
def test_probe_optimizer_is_fused_on_cuda_and_fused_adam_is_the_same_update_within_rounding():
    """On CUDA the probe's Adam is fused (its steps are launch-bound there); checked with the CPU's fused kernel,
    which torch has from 2.4: the weights equal the default Adam's within float rounding, not bit for bit."""
    optimizer = probes.probe_optimizer(torch.nn.Linear(2, 2).parameters(), 1e-3, torch.device('cuda'))
    assert optimizer.defaults['fused'] is True and not optimizer.defaults['foreach']
    default = probe_weights_after_two_epochs(lambda parameters: torch.optim.Adam(parameters, lr=1e-3))
    fused = probe_weights_after_two_epochs(lambda parameters: probes.probe_optimizer(parameters, 1e-3, 'cuda'))
    assert all(torch.allclose(default[key], fused[key], rtol=0, atol=1e-6) for key in default)


@pytest.mark.process
def test_end_to_end_prints_the_original_lines_and_writes_metrics(probe_args, tiny_encoder, tmp_path):
    results = tmp_path / 'probe'
    result = run_script('training_downstream_classifier.py', *probe_args, '--nn_epochs', '2',
                        '--results_dir', str(results))
    assert result.returncode == 0, result.stderr
    metrics = parse_metric_lines(result.stdout)
    names = ['Backdoored Accuracy (BA)', 'Attack Success Rate (ASR)', 'Attack Success Rate excluding target class']
    assert [(m['metric'], m['epoch']) for m in metrics] == [(f'Eval - {n}', e) for e in (1, 2) for n in names]
    assert all(0 <= m['value'] <= 100 for m in metrics)
    losses = re.findall(r'^Train Epoch: (\d+) \tLoss: (\d+\.\d{6})$', result.stdout, flags=re.M)
    assert [int(epoch) for epoch, _ in losses] == [1, 2]

    saved = json.loads((results / 'metrics.json').read_text())
    assert [saved['acc'], saved['asr'], saved['asr_excluding_target']] == [m['value'] for m in metrics[-3:]]
    assert (saved['epoch'], saved['dataset'], saved['reference_label']) == (2, 'synthetic_digits', 1)
    assert (saved['encoder'], saved['encoder_usage_info']) == (str(tiny_encoder), 'synthetic_shapes')
    assert json.loads((results / 'args.json').read_text())['reference_label'] == 1  # y[0] of the reference


def test_clean_encoder_names_usage_info_from_checkpoint_and_no_results_dir(monkeypatch, capsys, probe_args,
                                                                           tmp_path):
    """'clean' in the path gives CA / ASR-B; the checkpoint's recorded pre-training set is used; nothing written."""
    torch.manual_seed(1)
    folder = tmp_path / 'clean_encoder'
    save_atomic(encoder_checkpoint(SimCLR(width=8), None, 5, args={'pretraining_dataset': 'synthetic_shapes'}),
                folder / 'model_5.pth')
    argv = [a for a in probe_args if a not in ('--encoder_usage_info', 'synthetic_shapes')]
    argv[argv.index('--encoder') + 1] = str(folder / 'model_5.pth')
    call_main(monkeypatch, *argv, '--nn_epochs', '1', '--reference_label', '1')
    out = capsys.readouterr().out
    assert [m['metric'] for m in parse_metric_lines(out)] == [
        'Eval - Clean Accuracy (CA)', 'Eval - Attack Success Rate-Baseline (ASR-B)',
        'Eval - Attack Success Rate excluding target class']
    assert '"encoder_usage_info": "synthetic_shapes"' in out
    assert [p.name for p in folder.iterdir()] == ['model_5.pth']


def test_same_seed_same_numbers(monkeypatch, capsys, probe_args):
    call_main(monkeypatch, *probe_args, '--nn_epochs', '2')
    first = parse_metric_lines(capsys.readouterr().out)
    call_main(monkeypatch, *probe_args, '--nn_epochs', '2')
    assert parse_metric_lines(capsys.readouterr().out) == first


def test_bad_reference_label_is_a_one_line_error(probe_args, tmp_path):
    result = run_in_process('training_downstream_classifier.py', *probe_args, '--reference_label', '10',
                            '--results_dir', str(tmp_path / 'probe'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr
    assert lines[0].startswith('error: --reference_label 10') and '0..9' in lines[0]
    assert not (tmp_path / 'probe').exists()


def test_missing_usage_info_and_bad_usage_info_are_refused(monkeypatch, probe_args):
    argv = [a for a in probe_args if a not in ('--encoder_usage_info', 'synthetic_shapes')]
    with pytest.raises(UsageError, match='--encoder_usage_info is required'):
        call_main(monkeypatch, *argv)  # the fixture checkpoint records no pre-training set
    with pytest.raises(UsageError, match="--encoder_usage_info 'synthetic_digits': not a pre-training set"):
        call_main(monkeypatch, *argv, '--encoder_usage_info', 'synthetic_digits')


def test_missing_reference_label_without_reference_file_is_refused(monkeypatch, probe_args):
    argv = probe_args[:probe_args.index('--reference_file')] + probe_args[probe_args.index('--reference_file') + 2:]
    with pytest.raises(UsageError, match=r'--reference_label -1: .* 0\.\.9'):
        call_main(monkeypatch, *argv)


def test_encoder_usage_info_prefers_the_flag_then_the_recorded_set():
    recorded = {'args': {'encoder_usage_info': 'stl10', 'pretraining_dataset': 'cifar10'}}
    args = stage3.get_args_parser().parse_args(['--encoder', 'm.pth'])
    assert probes.encoder_usage_info(args, recorded) == 'stl10'  # BadEncoder's own flag comes first
    assert probes.encoder_usage_info(args, {'args': {'pretraining_dataset': 'cifar10'}}) == 'cifar10'
    args.encoder_usage_info = 'cifar10'
    assert probes.encoder_usage_info(args, recorded) == 'cifar10'  # the flag wins (common.encoders warns)
