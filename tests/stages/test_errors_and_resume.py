"""Untrusted checkpoints, bad input, killed runs, resuming — across all four stages.

Every expected mistake ends with ONE line on stderr naming the file or flag, exit status 2, no traceback
and no checkpoint written.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_in_process, run_script, write_split
from models import load_checkpoint


class RunsCode:
    """An object whose unpickling would run code: it touches a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.fixture
def evil_checkpoint(tmp_path, tiny_encoder):
    marker = tmp_path / 'code_ran'
    checkpoint = torch.load(tiny_encoder, weights_only=True)
    checkpoint['payload'] = RunsCode(marker)
    path = tmp_path / 'evil.pth'
    torch.save(checkpoint, path)
    return path, marker


def stage_commands(data_root: Path, trigger: Path, reference: Path, encoder: Path, out: Path) -> dict:
    common = ['--data_root', str(data_root), '--device', 'cpu', '--num_workers', '0', '--no_progress']
    return {
        'clean': ['train_clean_encoder.py', '--pretraining_dataset', 'synthetic_shapes', '--width', '8',
                  '--batch_size', '32', '--epochs', '1', '--results_dir', str(out), *common],
        'badencoder': ['train_badencoder.py', '--pretraining_dataset', 'synthetic_shapes',
                       '--shadow_dataset', 'synthetic_shapes', '--encoder_usage_info', 'synthetic_shapes',
                       '--downstreamTask', 'synthetic_digits', '--pretrained_encoder', str(encoder),
                       '--trigger_file', str(trigger), '--reference_file', str(reference),
                       '--batch_size', '32', '--epochs', '1', '--results_dir', str(out), *common],
        'mimic': ['MIMIC.py', '--pretraining_dataset', 'synthetic_shapes', '--teacher', str(encoder),
                  '--ratio', '0.25', '--batch_size', '32', '--epochs', '1', '--mi_epochs', '1',
                  '--results_dir', str(out), *common],
        'downstream': ['training_downstream_classifier.py', '--dataset', 'synthetic_digits',
                       '--encoder_usage_info', 'synthetic_shapes', '--encoder', str(encoder),
                       '--trigger_file', str(trigger), '--reference_file', str(reference),
                       '--reference_label', '1', '--nn_epochs', '1', '--results_dir', str(out), *common],
    }


def with_flag(command: list[str], flag: str, value: str) -> list[str]:
    command = list(command)
    if flag in command:
        command[command.index(flag) + 1] = value
    else:
        command += [flag, value]
    return command


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_checkpoints(folder: Path) -> bool:
    return not folder.exists() or not list(folder.glob('*.pth'))


@pytest.mark.parametrize('stage, flag', [('badencoder', '--pretrained_encoder'), ('mimic', '--teacher'),
                                         ('downstream', '--encoder')])
def test_code_executing_checkpoint_is_refused(stage, flag, tmp_path, data_root, trigger_file,
                                              reference_file, tiny_encoder, evil_checkpoint):
    evil, marker = evil_checkpoint
    out = tmp_path / 'out'
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)[stage]
    result = run_in_process(*with_flag(command, flag, str(evil)))
    assert_clean_error(result, str(evil))
    assert not marker.exists(), 'the pickle ran code'
    assert no_checkpoints(out)


def test_code_executing_suffix_encoder_is_refused(tmp_path, data_root, trigger_file, reference_file,
                                                  tiny_encoder, evil_checkpoint):
    evil, marker = evil_checkpoint
    out = tmp_path / 'out'
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)['clean']
    result = run_in_process(*command, '--suffix_encoder', str(evil))
    assert_clean_error(result, str(evil))
    assert not marker.exists() and no_checkpoints(out)


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, data_root):
    """Malformed inputs of docs/DESIGN.md §11, each in its own data root or file."""
    root = tmp_path_factory.mktemp('bad')
    with np.load(data_root / 'synthetic_shapes' / 'train.npz') as d:
        x, y = d['x'], d['y']
    files = {}
    for name, (bx, by) in {'float_images': (x.astype(np.float32), y),
                           'labels_out_of_range': (x, y + 10),
                           'length_mismatch': (x, y[:-3])}.items():
        write_split(root / name / 'synthetic_shapes', 'train', bx, by)
        write_split(root / name / 'synthetic_shapes', 'test', x[:64], y[:64])
    (root / 'no_y' / 'synthetic_shapes').mkdir(parents=True)
    np.savez(root / 'no_y' / 'synthetic_shapes' / 'train.npz', x=x)
    write_split(root / 'no_y' / 'synthetic_shapes', 'test', x[:64], y[:64])
    files['roots'] = root
    t = np.zeros((1, 16, 16, 3))
    np.savez(root / 'trigger16.npz', t=t, tm=np.ones((1, 16, 16, 3), dtype=np.int64))
    np.savez(root / 'trigger_no_mask.npz', t=np.zeros((1, 32, 32, 3)))
    np.savez(root / 'reference_label_99.npz', x=x[:1], y=np.array([99]))
    return files


BAD_INVOCATIONS = {
    # name: (stage, change, text the error line must contain)
    'missing dataset': ('clean', ('--data_root', 'ROOT/nowhere'), 'datasets.prepare'),
    'float images': ('clean', ('--data_root', 'ROOT/float_images'), 'uint8'),
    'labels out of range': ('mimic', ('--data_root', 'ROOT/labels_out_of_range'), 'label'),
    'x/y length mismatch': ('clean', ('--data_root', 'ROOT/length_mismatch'), 'labels'),
    'npz without y': ('clean', ('--data_root', 'ROOT/no_y'), "'y'"),
    'trigger of another size': ('badencoder', ('--trigger_file', 'ROOT/trigger16.npz'), 'trigger16.npz'),
    'trigger without mask': ('downstream', ('--trigger_file', 'ROOT/trigger_no_mask.npz'), 'tm'),
    'reference outside classes': ('badencoder', ('--reference_file', 'ROOT/reference_label_99.npz'),
                                  'reference_label_99.npz'),
    'missing checkpoint': ('mimic', ('--teacher', 'ROOT/none.pth'), 'none.pth'),
    'ratio zero': ('mimic', ('--ratio', '0'), '--ratio'),
    'ratio above one': ('mimic', ('--ratio', '1.5'), '--ratio'),
    'subset smaller than a batch': ('mimic', ('--ratio', '0.01'), 'batch'),
    'reference_label out of range': ('downstream', ('--reference_label', '10'), '--reference_label'),
    'epochs below one': ('clean', ('--epochs', '0'), '--epochs'),
    'unknown dataset': ('downstream', ('--dataset', 'imagenet'), 'imagenet'),
}


@pytest.mark.parametrize('case', sorted(BAD_INVOCATIONS))
def test_bad_invocation_is_one_line_error(case, tmp_path, data_root, trigger_file, reference_file,
                                          tiny_encoder, bad_files):
    stage, (flag, value), needle = BAD_INVOCATIONS[case]
    out = tmp_path / 'out'
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)[stage]
    value = value.replace('ROOT', str(bad_files['roots']))
    result = run_in_process(*with_flag(command, flag, value))
    assert_clean_error(result, needle)
    assert no_checkpoints(out)


def test_architecture_mismatch_names_the_keys(tmp_path, data_root, trigger_file, reference_file, tiny_encoder):
    from models import SimCLR, save_atomic
    from models.checkpoint import encoder_checkpoint
    student = tmp_path / 'resnet34.pth'
    save_atomic(encoder_checkpoint(SimCLR(arch='resnet34', width=8), None, 1), student)
    out = tmp_path / 'out'
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)['mimic']
    line = assert_clean_error(run_in_process(*command, '--student', str(student)), str(student))
    assert 'f.f.3.2' in line or 'resnet34' in line
    assert no_checkpoints(out)


@pytest.mark.process
def test_killed_runs_leave_only_loadable_checkpoints_and_resume(tmp_path, data_root, trigger_file,
                                                                reference_file, tiny_encoder):
    """SIGKILL a stage-0 run repeatedly while it saves every epoch; every checkpoint on disk loads."""
    out = tmp_path / 'run'
    command = with_flag(stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)['clean'],
                        '--epochs', '20') + ['--save_freq', '1']
    env = dict(os.environ, TQDM_DISABLE='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(4):
        args = command + (['--resume'] if list(out.glob('model_*.pth')) else ['--overwrite'])
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob('model_*.pth')):  # wait for the first save
            if process.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        for path in out.glob('*.pth'):
            load_checkpoint(path)  # raises on a half-written file
    assert kills >= 2
    epochs = sorted(int(p.stem.split('_')[1]) for p in out.glob('model_*.pth'))
    assert epochs, 'no checkpoint survived'
    result = run_script(*command, '--resume', timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(out / 'model_20.pth')['epoch'] == 20


@pytest.mark.parametrize('stage, flag, value', [('clean', '--lr', '0.01'), ('badencoder', '--lambda1', '2.0'),
                                                ('mimic', '--num_workers', '2')])
def test_resume_with_other_settings_is_refused(stage, flag, value, tmp_path, data_root, trigger_file,
                                               reference_file, tiny_encoder):
    out = tmp_path / 'out'
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, out)[stage]
    first = run_in_process(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob('*.pth')}
    result = run_in_process(*with_flag(with_flag(command, '--epochs', '2'), flag, value), '--resume')
    assert_clean_error(result, '--resume', flag)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob('*.pth')} == before


def test_stage3_resume_is_bit_identical(tmp_path, data_root, trigger_file, reference_file, tiny_encoder):
    command = stage_commands(data_root, trigger_file, reference_file, tiny_encoder, tmp_path / 'unused')['downstream']
    straight = run_in_process(*with_flag(with_flag(command, '--nn_epochs', '2'), '--results_dir',
                                         str(tmp_path / 'a')), '--save_freq', '1')
    assert straight.returncode == 0, straight.stderr[-2000:]
    split = with_flag(command, '--results_dir', str(tmp_path / 'b'))
    assert run_in_process(*with_flag(split, '--nn_epochs', '1'), '--save_freq', '1').returncode == 0
    again = run_in_process(*with_flag(split, '--nn_epochs', '2'), '--save_freq', '1')
    assert_clean_error(again, '--resume')  # an earlier run's probe is not silently replaced
    resumed = run_in_process(*with_flag(split, '--nn_epochs', '2'), '--save_freq', '1', '--resume')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / 'a' / 'probe_2.pth')
    b = load_checkpoint(tmp_path / 'b' / 'probe_2.pth')
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    metrics_a = (tmp_path / 'a' / 'metrics.json').read_text()
    assert metrics_a == (tmp_path / 'b' / 'metrics.json').read_text()
    lines = [line for line in straight.stdout.splitlines() if '"epoch": 2' in line]
    assert lines and all(line in resumed.stdout for line in lines)


@pytest.mark.process
def test_ctrl_c_is_one_line_and_leaves_loadable_checkpoints(tmp_path, data_root, trigger_file, reference_file,
                                                            tiny_encoder):
    """SIGINT to the whole process group (what Ctrl-C does), DataLoader workers included."""
    out = tmp_path / 'run'
    command = with_flag(with_flag(stage_commands(data_root, trigger_file, reference_file, tiny_encoder,
                                                 out)['clean'], '--epochs', '40'), '--num_workers', '2')
    env = dict(os.environ, TQDM_DISABLE='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, *command, '--save_freq', '1'], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob('model_*.pth')) and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)
    assert process.poll() is None, 'the run ended before it could be interrupted'
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('interrupted:'), err[-2000:]
    for path in out.glob('*.pth'):
        load_checkpoint(path)
