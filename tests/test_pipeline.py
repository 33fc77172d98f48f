"""scripts/run_pipeline.sh on a tiny setting: all four stages, skip when finished, resume when interrupted."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO


def pipeline(run_dir: Path, data_root: Path, reference: Path, trigger: Path, *extra: str,
             eval_progress: bool = False):
    """The pipeline on the tiny setting; progress bars only for the evaluations when `eval_progress`."""
    command = ['bash', 'scripts/run_pipeline.sh', '--run_dir', str(run_dir), '--data_root', str(data_root),
               '--device', 'cpu', '--num_workers', '0', '--pretraining_dataset', 'synthetic_shapes',
               '--downstream_dataset', 'synthetic_digits', '--reference_file', str(reference),
               '--trigger_file', str(trigger), '--width', '8', '--clean_epochs', '2', '--badencoder_epochs', '1',
               '--mimic_epochs', '2', '--mi_epochs', '1', '--nn_epochs', '2', '--ratio', '0.25',
               '--save_freq', '1', '--clean_args', '--batch_size 32 --no_progress',
               '--badencoder_args', '--batch_size 32 --no_progress', '--mimic_args', '--batch_size 32 --no_progress',
               '--eval_args', '' if eval_progress else '--no_progress', *extra]
    env = dict(os.environ, TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    if eval_progress:
        del env['TQDM_DISABLE']
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=600)
    # decoded by hand: text mode would turn the progress bars' \r into \n
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_pipeline_runs_skips_and_resumes(tmp_path, data_root, reference_file, trigger_file):
    run = tmp_path / 'run'
    first = pipeline(run, data_root, reference_file, trigger_file, eval_progress=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the evaluations drew progress bars (redrawn with \r) on the terminal; their logs keep clean lines
    assert '\r' in first.stdout
    log = (run / 'eval_mimic.log').read_bytes().decode()  # not read_text: it would turn \r into \n
    assert '\r' not in log
    assert any(line.startswith('{"metric": ') for line in log.splitlines())
    for path in ['clean/model_2.pth', 'backdoor/model_1.pth', 'mimic/model2.pth', 'mimic/mi.json',
                 'eval_clean/metrics.json', 'eval_backdoored/metrics.json', 'eval_mimic/metrics.json',
                 'run.json', 'table.md', 'table.csv', 'summary.json']:
        assert (run / path).is_file(), path
    setting = json.loads((run / 'run.json').read_text())
    assert setting['target_label'] == 1 and setting['downstream_dataset'] == 'synthetic_digits'
    summary = json.loads((run / 'summary.json').read_text())
    assert set(summary) == {'clean', 'backdoored', 'mimic'}
    assert all(0 <= summary[e]['acc'] <= 100 and 0 <= summary[e]['asr'] <= 100 for e in summary)

    # run again: every stage is skipped, nothing is rewritten
    mtime = (run / 'mimic' / 'model2.pth').stat().st_mtime_ns
    again = pipeline(run, data_root, reference_file, trigger_file)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ['clean', 'backdoor', 'mimic', 'eval_clean', 'eval_backdoored', 'eval_mimic']:
        assert f'== {stage}: done' in again.stdout
    assert (run / 'mimic' / 'model2.pth').stat().st_mtime_ns == mtime

    # an interrupted MIMIC stage (only its epoch-1 checkpoint left) resumes, and its evaluation is redone
    (run / 'mimic' / 'model2.pth').unlink()
    (run / 'eval_mimic' / 'metrics.json').unlink()
    # ... and baseline defences asked for now run beside it on the same backdoored encoder
    resumed = pipeline(run, data_root, reference_file, trigger_file, '--defences', 'ft,clp',
                       '--defence_args', '--batch_size 32 --no_progress')
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    mimic_line = next(line for line in resumed.stdout.splitlines() if line.startswith('== mimic:'))
    assert '--resume' in mimic_line
    assert '== backdoor: done' in resumed.stdout and '== eval_backdoored: done' in resumed.stdout
    assert (run / 'mimic' / 'model2.pth').is_file() and (run / 'eval_mimic' / 'metrics.json').is_file()
    for path in ['defence_ft/model_2.pth', 'defence_clp/model_0.pth', 'eval_ft/metrics.json', 'eval_clp/metrics.json',
                 'table_defences.csv', 'defence_ft/stage_seconds.txt', 'mimic/stage_seconds.txt']:
        assert (run / path).is_file(), path
    summary = json.loads((run / 'summary.json').read_text())
    assert set(summary['defences']) == {'mimic', 'ft', 'clp'}
    assert all(set(row) == {'acc', 'asr', 'asr_excluding_target', 'seconds'} for row in summary['defences'].values())
    assert '| clp |' in (run / 'table.md').read_text()


@pytest.mark.parametrize('args, message', [
    ([], '--run_dir is required'),
    (['--run_dir', 'x', '--reference_file', 'nowhere.npz'], 'nowhere.npz'),
    (['--run_dir', 'x', '--bogus', '1'], 'unknown option --bogus'),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--defences', 'ft,magic'], "unknown defence 'magic'"),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--augment', 'gpu'], "--augment: expected auto, pil or tensor"),
])
def test_pipeline_bad_arguments(args, message):
    result = subprocess.run(['bash', 'scripts/run_pipeline.sh', *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', 'scripts/reproduce_paper.sh', '--dry_run', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_reproduce_paper_dry_run_lists_every_experiment_and_creates_nothing(tmp_path):
    runs = tmp_path / 'paper'
    result = dry_run(str(runs))
    assert result.returncode == 0, result.stderr
    assert not runs.exists()
    out = result.stdout
    lines = out.splitlines()
    assert lines.index(next(l for l in lines if 'train_clean_encoder.py' in l)) < lines.index(
        next(l for l in lines if l.startswith('== run')))  # the clean encoder first, once
    assert sum('train_clean_encoder.py' in l and '--data_dir' not in l for l in lines) == 1
    for task in ('gtsrb', 'svhn', 'stl10'):
        for attack in ('badencoder', 'drupe'):
            assert f'== run {runs}/main/cifar10_{task}_{attack}' in out
    assert f'== run {runs}/main/cifar10_cifar10_ctrl' in out and 'datasets.poison' in out
    ctrl_teacher = f'--teacher {runs}/main/cifar10_cifar10_ctrl/backdoor/model_800.pth'
    assert sum(ctrl_teacher in l for l in lines) == 1 + 7  # CTRL's poisoned SimCLR encoder: MIMIC and each baseline
    purifiers = [l for l in lines if 'MIMIC.py' in l or 'baseline_defence.py' in l]
    assert purifiers and all(re.search(r'--teacher \S+\.pth', l) for l in purifiers)
    assert sum('baseline_defence.py' in l for l in lines) == 7 * 7  # every defence on every main run
    for ratio in ('0.01', '0.02', '0.04', '0.06', '0.08', '0.10'):
        assert f'{runs}/ratio/ratio_{ratio} (ratio {ratio})' in out
    for size in (5, 10, 15, 20):
        assert f'--size {size}' in out and f'{runs}/trigger_size/white_{size}' in out
    for flag in ('--layer_weights uniform', '--no_attention', '--no_clone', '--no_contrastive', '--mi_model student'):
        assert flag in out, flag
    assert f'{runs}/triggers/red_21' in out
    for experiment in ('main', 'ratio', 'trigger_size', 'ablation', 'mi_model', 'triggers'):
        assert f'--out {runs}/{experiment}/table' in out, experiment


def test_reproduce_paper_dry_run_of_one_experiment_at_demo_scale(tmp_path):
    result = dry_run('--scale', 'demo', '--experiments', 'ratio', str(tmp_path / 'demo'))
    assert result.returncode == 0, result.stderr
    assert 'datasets.prepare synthetic_shapes' in result.stdout and 'train_badencoder.py' in result.stdout
    assert '/main/' in result.stdout and 'baseline_defence.py' not in result.stdout  # only the shared backdoor
    assert result.stdout.count('--backdoored_encoder') == 0 and result.stdout.count('== backdoor: given') == 6
    lines = result.stdout.splitlines()
    training = [l for l in lines if any(s in l for s in ('train_clean_encoder.py', 'train_badencoder.py', 'MIMIC.py'))]
    assert len(training) == 2 + 7 and all('--augment tensor' in l for l in training)  # the demo's fast path
    assert not any('--augment' in l for l in lines if 'training_downstream_classifier.py' in l)
    assert not (tmp_path / 'demo').exists()


@pytest.mark.parametrize('args, message', [
    (['--experiments', 'main,bogus'], "unknown experiment 'bogus'"),
    (['--scale', 'huge'], "--scale: expected paper or demo"),
    (['--frobnicate'], 'unknown option --frobnicate'),
])
def test_reproduce_paper_bad_arguments(args, message):
    result = dry_run(*args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count('\n') == 1
