"""The stage-2 driver of the baselines (baseline_defence.py, defences/stage.py): its help, its flags, every baseline
end to end on tiny data, its one-line errors, and the probe of a purified encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import baseline_defence
from core.errors import UsageError
from defences import BASELINES
from models import SimCLR, load_encoder
from conftest import run_in_process, run_script
from defence_helpers import tiny_args


@pytest.mark.process
def test_help_lists_every_baseline():
    result = run_script('baseline_defence.py', '--help')
    assert result.returncode == 0
    assert '{' + ','.join(BASELINES) + '}' in result.stdout and 'sslcleanse' in BASELINES
    for flag in ('--prune_ratio', '--fp_min_cosine', '--nad_betas', '--clp_u', '--anp_eps', '--anp_perturbation',
                 '--anp_bn_stats', '--invert_steps', '--invert_unlearn', '--decree_threshold',
                 '--sslcleanse_trigger_weight', '--teacher', '--ratio'):
        assert flag in result.stdout, flag


def test_trajectory_flags_are_marked_same_on_resume():
    from core.cli import resume_flags
    marked = resume_flags(baseline_defence.get_args_parser())
    for flag in ('prune_ratio', 'fp_min_cosine', 'fp_step', 'nad_betas', 'nad_teacher_epochs', 'anp_eps', 'anp_steps',
                 'anp_perturbation', 'anp_bn_stats', 'anp_alpha', 'anp_lr', 'anp_iterations', 'anp_threshold',
                 'invert_steps', 'invert_lr', 'invert_lambda', 'invert_unlearn', 'sslcleanse_clean_weight',
                 'sslcleanse_trigger_weight', 'sslcleanse_warmup'):
        assert flag in marked, flag


@pytest.mark.parametrize('defence', BASELINES)
def test_every_defence_end_to_end(data_root, tiny_encoder, tmp_path, defence):
    out = tmp_path / defence
    extra = {'anp': ['--anp_iterations', '3'], 'invert': ['--invert_steps', '3'],
             'sslcleanse': ['--invert_steps', '3']}.get(defence, [])
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, *extra, defence=defence))
    report = json.loads((out / 'defence.json').read_text())
    assert report['defence'] == defence and report['seconds'] >= 0
    assert report['images'] == (0 if defence == 'clp' else 64)  # clp is data-free
    model, checkpoint = load_encoder(out / report['checkpoint'])  # weights_only, as every stage loads it
    # a plain SimCLR state_dict in the original layout: the original code's SimCLR loads it key for key
    assert list(checkpoint['state_dict']) == list(SimCLR(width=8).state_dict())
    assert {'epoch', 'state_dict', 'optimizer'} <= set(checkpoint)
    assert json.loads((out / 'args.json').read_text())['defence'] == defence
    suspect, _ = load_encoder(tiny_encoder)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), suspect.state_dict().values()))
    assert changed or defence in ('clp', 'anp')  # the pruning ones may find nothing to prune on a random encoder
    batchnorms = [name[:-len('.running_var')] for name in checkpoint['state_dict']
                  if name.startswith('f.') and name.endswith('.running_var')]  # every BatchNorm of the encoder
    if defence == 'anp':
        assert sorted(report['min_mask']) == sorted(batchnorms)
    if defence == 'clp':
        assert sorted(report['max_z']) == sorted(batchnorms)
    if defence in ('invert', 'sslcleanse'):
        assert {'l1_norm', 'pl1_norm', 'detected'} <= set(report['detection']) and report['unlearned']
    if defence == 'fp':
        assert report['stop'] == 'agreement' and report['agreement'][str(report['channels_pruned'])] >= 0.9


def test_stage3_evaluates_a_purified_encoder(data_root, tiny_encoder, tmp_path, trigger_file, reference_file):
    out = tmp_path / 'fp'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, defence='fp'))
    result = run_in_process('training_downstream_classifier.py', '--dataset', 'synthetic_digits', '--data_root',
                            str(data_root), '--encoder_usage_info', 'synthetic_shapes', '--encoder', str(out / 'model_1.pth'),
                            '--trigger_file', str(trigger_file), '--reference_file', str(reference_file),
                            '--reference_label', '1', '--nn_epochs', '1', '--results_dir', str(tmp_path / 'eval'),
                            '--device', 'cpu', '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    assert np.isfinite(metrics['acc']) and np.isfinite(metrics['asr'])


@pytest.mark.parametrize('flags, message', [
    (['--prune_ratio', '1'], '--prune_ratio must lie in [0, 1)'),
    (['--fp_min_cosine', '2'], '--fp_min_cosine must lie in [-1, 1]'),
    (['--invert_unlearn', 'never'], "invalid choice: 'never'"),
    (['--anp_perturbation', 'both'], "invalid choice: 'both'"),
    (['--sslcleanse_warmup', '-1'], '--sslcleanse_warmup must be 0'),
    (['--ratio', '0.05'], 'fewer than one batch of 32'),
    (['--nad_betas', '1,2'], '--nad_betas: expected 4'),
])
def test_bad_flags_are_one_line_and_write_nothing(data_root, tiny_encoder, tmp_path, flags, message):
    out = tmp_path / 'out'
    result = run_in_process('baseline_defence.py', *tiny_args(data_root, tiny_encoder, out, *flags, defence='fp'))
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr
    assert message in result.stderr and not out.exists()


def test_unknown_defence_is_one_line(tmp_path):
    result = run_in_process('baseline_defence.py', '--defence', 'magic', '--teacher', 'x', '--results_dir', str(tmp_path))
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'magic' in result.stderr


def test_refuses_to_clobber_and_resume_needs_a_checkpoint(data_root, tiny_encoder, tmp_path):
    out = tmp_path / 'ft'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out))
    with pytest.raises(UsageError, match='already holds model_1.pth'):
        baseline_defence.main(tiny_args(data_root, tiny_encoder, out))
    with pytest.raises(UsageError, match='--resume: no checkpoint'):
        baseline_defence.main(tiny_args(data_root, tiny_encoder, tmp_path / 'empty', '--resume'))


def test_help_says_what_each_defence_reads():
    parser_help = baseline_defence.get_args_parser().format_help()
    for name in BASELINES:
        assert f'{name}: the suspect' in ' '.join(parser_help.split()), name
    assert 'data-free: no image is read' in ' '.join(parser_help.split())
