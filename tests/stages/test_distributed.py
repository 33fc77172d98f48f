"""Runs under torchrun (common/distributed.py): gloo on this CPU, 2 processes started by the tests.

What is equal to one process, and checked here:
- the data split: each rank's rows of each global batch are those one process would draw, on the PIL path (the
  order) and on the tensor path (the order and the augmentation draws);
- stage 1: one epoch with 2 processes ends with the parameters of one process on the same global batches
  (--augment tensor, so that the references' augmentations are the same draws; its BatchNorm is frozen), for
  BadEncoder and for DRUPE, whose terms are statistics of the whole batch;
- stage 0 with a BatchNorm-free encoder (on the CPU each process's BatchNorm would see only its half of the
  batch: SyncBatchNorm needs CUDA): the gathered NT-Xent, the data split and DDP's averaging give the parameters
  and the logged loss of one process.
And: 2-process runs of stages 0, 1, 2 and of baseline defences leave exactly one set of files; a failure in one
process stops both with one line and the last checkpoint intact, and the run resumes with one process.
Every run is bounded in time; on a timeout torchrun and the processes it started are killed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import distributed
from conftest import REPO, run_in_process
from core import processes
from core.errors import UsageError
from datasets.fastpath import DevicePairBatches, DeviceShadowBatches
from datasets.loaders import RankBatches, epoch_loader, epoch_permutation
from models import SimCLR, load_checkpoint
from models.losses import nt_xent, nt_xent_anchors

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
RUN_TIMEOUT_S = 300
TRIGGER = REPO / 'trigger' / 'trigger_pt_white_21_10_ap_replace.npz'


# ------------------------------------------------------------------------------- one process, no group

def test_nt_xent_anchors_over_disjoint_slices_average_to_nt_xent():
    generator = torch.Generator().manual_seed(0)
    out_1, out_2 = (torch.nn.functional.normalize(torch.randn(12, 7, generator=generator, dtype=torch.float64),
                                                  dim=1) for _ in range(2))
    full = nt_xent(out_1, out_2, 0.5)
    assert torch.allclose(nt_xent_anchors(out_1, out_2, 0.5, slice(None)), full, rtol=0, atol=1e-12)
    for world in (2, 3, 4):
        local = 12 // world
        parts = [nt_xent_anchors(out_1, out_2, 0.5, slice(r * local, (r + 1) * local)) for r in range(world)]
        assert torch.allclose(torch.stack(parts).mean(), full, rtol=0, atol=1e-12)
    assert not torch.allclose(parts[0], full)  # a slice alone is not the batch's loss


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 70

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize('world', [2, 4])
def test_rank_batches_split_the_batches_of_the_single_process_loader(world):
    loader = epoch_loader(Indices(), batch_size=16, shuffle=True, drop_last=True, num_workers=0, seed=7, epoch=3,
                          device=torch.device('cpu'))
    single = [batch.tolist() for batch in loader]
    assert [index for batch in single for index in batch] == epoch_permutation(70, 7, 3)[:64].tolist()
    shares = [list(RankBatches(70, 16, 7, 3, rank, world)) for rank in range(world)]
    assert all(len(share) == len(single) == 4 for share in shares)
    for step, batch in enumerate(single):
        assert [index for share in shares for index in share[step]] == batch  # rank-major rows of the batch
        assert all(len(share[step]) == 16 // world for share in shares)


def test_tensor_path_ranks_take_their_rows_of_one_global_draw():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    single = list(DevicePairBatches(images, NORM, 16, seed=1, epoch=2))
    shares = [list(DevicePairBatches(images, NORM, 16, seed=1, epoch=2, rank=r, world_size=2)) for r in range(2)]
    for step, (view_1, view_2) in enumerate(single):
        assert torch.equal(torch.cat([shares[0][step][0], shares[1][step][0]]), view_1)
        assert torch.equal(torch.cat([shares[0][step][1], shares[1][step][1]]), view_2)
    references = images[:2]
    single = list(DeviceShadowBatches(40, references, NORM, 16, seed=1, epoch=2))
    shares = [list(DeviceShadowBatches(40, references, NORM, 16, seed=1, epoch=2, rank=r, world_size=2))
              for r in range(2)]
    for step, (indices, views) in enumerate(single):
        assert torch.equal(torch.cat([shares[0][step][0], shares[1][step][0]]), indices)
        assert torch.equal(torch.cat([shares[0][step][1], shares[1][step][1]]), views)  # (B, R, 3, H, W)


def test_without_torchrun_everything_is_the_single_process_path(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    args = argparse.Namespace(device='cpu', gpu='0', batch_size=3, dist_timeout=10.0)
    assert distributed.setup(args) == torch.device('cpu') and not processes.is_distributed()
    assert (processes.rank(), processes.world_size(), processes.is_main()) == (0, 1, True)
    model = SimCLR(width=4)
    assert distributed.data_parallel(model, torch.device('cpu')) is model
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.equal(distributed.nt_xent(x, y, 0.5), nt_xent(x, y, 0.5))
    assert distributed.gather(x) is x
    values = {'loss': x.sum()}
    assert distributed.mean_over_ranks(values) is values
    assert distributed.on_main(lambda: 41 + 1) == 42


def test_torchrun_flags_that_cannot_work_are_refused_before_joining(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(UsageError, match=r'--batch_size 63 is the global batch .* 2 processes .* multiple of 2'):
        distributed.setup(argparse.Namespace(device='cpu', gpu='0', batch_size=63, dist_timeout=10.0))
    with pytest.raises(UsageError, match='--device cuda:1: under torchrun each process takes the GPU of its'):
        distributed.setup(argparse.Namespace(device='cuda:1', gpu='0', batch_size=64, dist_timeout=10.0))
    with pytest.raises(UsageError, match='--dist_timeout must be positive'):
        distributed.setup(argparse.Namespace(device='cpu', gpu='0', batch_size=64, dist_timeout=0.0))
    assert processes.launched_rank() == 1 and not processes.is_distributed()


def test_errors_under_torchrun_are_one_line_from_the_right_process(monkeypatch, capfd):
    gloo = RuntimeError('[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234. This is '
                        'typically caused by a remote worker crashing.')
    assert processes.collective_failed(gloo) and not processes.collective_failed(RuntimeError('simulated'))
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    processes.report_error('error: bad flag', same_on_every_process=True)  # rank 0 says it for everyone
    processes.report_error('error: RuntimeError: out of memory', same_on_every_process=False)
    monkeypatch.setenv('RANK', '0')
    processes.report_error('error: bad flag', same_on_every_process=True)
    assert capfd.readouterr().err.splitlines() == ['[rank 1] error: RuntimeError: out of memory', 'error: bad flag']


# --------------------------------------------------------------------------------- 2 processes

def run_command(command: list[str], timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `command` from the repository root; on a timeout, kill it and every process it started (torchrun
    starts its workers in sessions of their own), then fail."""
    env = dict(os.environ, TQDM_DISABLE='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        env.pop(name, None)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(process.pid):
            with_suppressed(os.kill, pid, signal.SIGKILL)
        process.kill()
        process.communicate()
        pytest.fail(f'timed out after {timeout} s: {" ".join(command)}')
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and theirs (from /proc), deepest last."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = [int(c) for c in Path(f'/proc/{parent}/task/{parent}/children').read_text().split()]
        except OSError:
            children = []
        found += children
        frontier += children
    return found


def with_suppressed(function, *args) -> None:
    try:
        function(*args)
    except ProcessLookupError:
        pass


def one_process(script: str | Path, *args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, str(script), *args])


def two_processes(script: str | Path, *args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(script), *args, '--dist_timeout', '120'])


def our_lines(stderr: str) -> list[str]:
    """What the stages themselves wrote to stderr (torchrun's own log lines and failure summary left out)."""
    return [line for line in stderr.splitlines()
            if line.startswith(('error:', '[rank', 'interrupted:', 'warning:', 'note:'))]


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)['state_dict']


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def log_rows(path: Path) -> list[dict]:
    with open(path, newline='') as handle:
        return list(csv.DictReader(handle))


def stage1_args(data_root, reference, encoder, results_dir, *extra: str) -> list[str]:
    return ['--data_root', str(data_root), '--pretraining_dataset', 'synthetic_shapes',
            '--shadow_dataset', 'synthetic_shapes', '--encoder_usage_info', 'synthetic_shapes',
            '--downstreamTask', 'synthetic_digits', '--trigger_file', str(TRIGGER), '--reference_file', str(reference),
            '--pretrained_encoder', str(encoder), '--results_dir', str(results_dir), '--device', 'cpu',
            '--num_workers', '0', '--no_progress', *extra]


FINALISATION_PROBE = '''\
"""train_badencoder.py as its own command line runs it, and an atexit handler that writes which threads are left
when the interpreter finalises: a torchrun process must end before that (core.processes.leave_process), since
gloo's leftover threads may abort it there."""
import atexit
import os

import train_badencoder as stage
from core.cli import run_main


def record() -> None:
    names = []
    if os.path.isdir('/proc/self/task'):
        for task in os.listdir('/proc/self/task'):
            try:
                with open(f'/proc/self/task/{task}/comm') as handle:
                    names.append(handle.read().strip())
            except OSError:
                pass
    with open(os.environ['FINALISATION_RECORD'] + '.' + os.environ.get('RANK', '0'), 'w') as handle:
        handle.write(' '.join(sorted(names)))


atexit.register(record)
run_main(stage.main)
'''


@pytest.mark.parametrize('attack', ['badencoder', 'drupe'])
@pytest.mark.process
def test_stage1_two_processes_take_the_single_process_step(tmp_path, data_root, tiny_encoder, reference_file,
                                                           three_references, attack, monkeypatch):
    # One epoch of 2 steps of the global batch 64 (a quarter of the 256 shadow images is 64: one step; half, 2).
    extra = ['--epochs', '1', '--batch_size', '64', '--shadow_fraction', '0.5', '--augment', 'tensor', '--lr', '0.01']
    reference = reference_file
    if attack == 'drupe':  # every DRUPE term in the first epoch: no warm-up, the preserve phase at once
        reference = three_references
        extra += ['--attack', 'drupe', '--drupe_warmup_epochs', '0', '--drupe_preserve_from', '1']
    single = run_in_process('train_badencoder.py', *stage1_args(data_root, reference, tiny_encoder,
                                                                tmp_path / 'one', *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    probe = tmp_path / 'stage1_probe.py'
    probe.write_text(FINALISATION_PROBE)
    monkeypatch.setenv('FINALISATION_RECORD', str(tmp_path / 'finalised'))
    double = two_processes(probe, *stage1_args(data_root, reference, tiny_encoder, tmp_path / 'two', *extra))
    assert double.returncode == 0, double.stderr[-3000:]
    # neither process reached the interpreter's finalisation (with gloo's threads still running there)
    assert sorted(path.read_text() for path in tmp_path.glob('finalised.*')) == []
    one, two = state(tmp_path / 'one' / 'model_1.pth'), state(tmp_path / 'two' / 'model_1.pth')
    assert max_difference(one, two) <= 1e-5
    assert max_difference(one, state(tiny_encoder)) > 1e-4  # the step moved the encoder
    rows_1, rows_2 = log_rows(tmp_path / 'one' / 'log.csv'), log_rows(tmp_path / 'two' / 'log.csv')
    assert [row['epoch'] for row in rows_1] == [row['epoch'] for row in rows_2] == ['0', '1']
    for row_1, row_2 in zip(rows_1, rows_2):
        assert row_1.keys() == row_2.keys()
        for key in row_1:  # the logged loss and terms are the global batch's; kNN: within one test image
            tolerance = 1.0 if key.startswith('knn') else 1e-5
            assert float(row_1[key] or 0) == pytest.approx(float(row_2[key] or 0), abs=tolerance), key


BATCHNORM_FREE_STAGE0 = '''\
"""train_clean_encoder.py with every BatchNorm of the encoder replaced by the identity."""
import torch

import train_clean_encoder as stage0
from core.cli import run_main


def without_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            without_batchnorm(child)
    return module


initial_model = stage0.initial_model
stage0.initial_model = lambda args: without_batchnorm(initial_model(args))
run_main(stage0.main)
'''


@pytest.mark.process
def test_stage0_two_processes_take_the_single_process_step(tmp_path, data_root):
    """BatchNorm-free, so that the step is the same on the CPU: this checks the gathered NT-Xent (negatives from
    the other process, gradients through the gather), the data split and DDP's averaging; SGD, whose step is
    proportional to the gradient (Adam's first step is ±lr wherever the gradient is not 0, noise included)."""
    script = tmp_path / 'bn_free_stage0.py'
    script.write_text(BATCHNORM_FREE_STAGE0)
    args = ['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root), '--width', '8',
            '--batch_size', '64', '--epochs', '1', '--optimizer', 'sgd', '--lr', '0.05', '--augment', 'tensor',
            '--device', 'cpu', '--num_workers', '0', '--no_progress', '--knn-k', '20']
    single = one_process(script, *args, '--results_dir', str(tmp_path / 'one'))
    assert single.returncode == 0, single.stderr[-3000:]
    double = two_processes(script, *args, '--results_dir', str(tmp_path / 'two'))
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = state(tmp_path / 'one' / 'model_1.pth'), state(tmp_path / 'two' / 'model_1.pth')
    assert not any('bn' in key or key.startswith('f.f.1.') for key in one)  # no BatchNorm left
    assert max_difference(one, two) <= 1e-5
    [row_1], [row_2] = log_rows(tmp_path / 'one' / 'log.csv'), log_rows(tmp_path / 'two' / 'log.csv')
    # the epoch's mean loss (about ln 127 = 4.8, one float32 step 4.8e-7) after steps whose weights differ as above
    assert float(row_1['train_loss']) == pytest.approx(float(row_2['train_loss']), abs=1e-5)
    # the kNN monitor, in rank 0, of the same encoder (within one of the 128 test images)
    assert float(row_1['test_acc@1']) == pytest.approx(float(row_2['test_acc@1']), abs=1.0)


def assert_one_set_of_files(results_dir: Path, expected: set[str], stdout: str, epochs: list[int]) -> None:
    """Exactly the expected files (no temporary ones), one log row per epoch, each printed once, and the
    resolved arguments printed once."""
    assert {path.name for path in results_dir.iterdir()} == expected
    assert [int(row['epoch']) for row in log_rows(results_dir / 'log.csv')] == epochs
    json_lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]
    assert sum('results_dir' in line for line in json_lines) == 1
    assert [line['epoch'] for line in json_lines if 'epoch' in line and 'results_dir' not in line] == epochs


@pytest.mark.process
def test_stages_0_and_1_with_two_processes_leave_one_set_of_files(tmp_path, data_root, tiny_encoder, reference_file):
    clean = tmp_path / 'clean'
    run = two_processes('train_clean_encoder.py', '--pretraining_dataset', 'synthetic_shapes', '--data_root',
                        str(data_root), '--width', '8', '--batch_size', '64', '--epochs', '2', '--save_freq', '1',
                        '--device', 'cpu', '--num_workers', '1', '--no_progress', '--knn-k', '20',
                        '--results_dir', str(clean))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_one_set_of_files(clean, {'args.json', 'log.csv', 'model_1.pth', 'model_2.pth'}, run.stdout, [1, 2])
    assert run.stdout.count('saved ') == 1 and our_lines(run.stderr) == []
    keys = set(state(clean / 'model_2.pth'))
    assert keys == set(SimCLR(width=8).state_dict())  # plain SimCLR keys: no 'module.' prefix

    backdoor = tmp_path / 'backdoor'
    run = two_processes('train_badencoder.py', *stage1_args(data_root, reference_file, clean / 'model_2.pth', backdoor,
                                                             '--epochs', '1', '--batch_size', '64', '--num_workers',
                                                             '1', '--knn-k', '20'))
    assert run.returncode == 0, run.stderr[-3000:]
    # the monitor's row before training (epoch 0) and after epoch 1, each once
    assert_one_set_of_files(backdoor, {'args.json', 'log.csv', 'model_1.pth'}, run.stdout, [0, 1])
    assert set(state(backdoor / 'model_1.pth')) == keys


@pytest.mark.parametrize('script, extra, checkpoint, files', [
    ('MIMIC.py', ['--mi_epochs', '2'], 'model2.pth',
     {'args.json', 'defence.json', 'mi.json', 'log.csv', 'model2.pth'}),
    ('baseline_defence.py', ['--defence', 'kd'], 'model_2.pth', {'args.json', 'defence.json', 'log.csv', 'model_2.pth'}),
    ('baseline_defence.py', ['--defence', 'invert', '--invert_steps', '3'], 'model_2.pth',
     {'args.json', 'defence.json', 'log.csv', 'model_2.pth', 'inverted_trigger.npz'}),
    ('baseline_defence.py', ['--defence', 'sslcleanse', '--invert_steps', '3'], 'model_2.pth',
     {'args.json', 'defence.json', 'log.csv', 'model_2.pth', 'inverted_trigger.npz'}),
], ids=['mimic', 'kd', 'invert', 'sslcleanse'])
@pytest.mark.process
def test_stage2_with_two_processes_leaves_one_set_of_files(tmp_path, data_root, tiny_encoder, script, extra,
                                                           checkpoint, files):
    out = tmp_path / 'out'
    run = two_processes(script, '--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root),
                        '--teacher', str(tiny_encoder), '--ratio', '0.25', '--batch_size', '32', '--epochs', '2',
                        '--device', 'cpu', '--num_workers', '0', '--no_progress', '--results_dir', str(out), *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_one_set_of_files(out, files, run.stdout, [1, 2])
    assert set(state(out / checkpoint)) == set(SimCLR(width=8).state_dict())
    if script == 'MIMIC.py':  # the MI step ran once
        assert run.stdout.count('MI of each tapped layer') == 1


FAILING_STAGE0 = '''\
"""train_clean_encoder.py whose process of rank FAIL_RANK raises when epoch FAIL_EPOCH starts."""
import os

import train_clean_encoder as stage0
from core.cli import run_main

train_one_epoch = stage0.train_one_epoch


def failing(model, loader, optimizer, temperature, epoch, *args):
    if os.environ.get('RANK') == os.environ['FAIL_RANK'] and epoch == int(os.environ['FAIL_EPOCH']):
        raise RuntimeError('simulated failure')
    return train_one_epoch(model, loader, optimizer, temperature, epoch, *args)


stage0.train_one_epoch = failing
run_main(stage0.main)
'''


@pytest.mark.process
def test_a_failing_process_stops_the_run_and_one_process_resumes_it(tmp_path, data_root, monkeypatch):
    script = tmp_path / 'failing_stage0.py'
    script.write_text(FAILING_STAGE0)
    monkeypatch.setenv('FAIL_RANK', '1')
    monkeypatch.setenv('FAIL_EPOCH', '2')
    results = tmp_path / 'run'
    args = ['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root), '--width', '8',
            '--batch_size', '64', '--epochs', '2', '--save_freq', '1', '--device', 'cpu', '--num_workers', '1',
            '--no_progress', '--knn-k', '20', '--results_dir', str(results)]
    stopped = two_processes(script, *args)
    assert stopped.returncode != 0
    # one line from the process that failed; rank 0, whose next collective failed, is stopped by torchrun first,
    # or reports that in one line
    lines = our_lines(stopped.stderr)
    assert '[rank 1] error: RuntimeError: simulated failure' in lines and len(lines) <= 2
    assert all('a collective failed' in line for line in lines if not line.startswith('[rank 1]'))
    assert {path.name for path in results.iterdir()} == {'args.json', 'log.csv', 'model_1.pth'}

    resumed = run_in_process('train_clean_encoder.py', *args, '--resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {results / 'model_1.pth'} (epoch 1)" in resumed.stdout
    assert [int(row['epoch']) for row in log_rows(results / 'log.csv')] == [1, 2]
    assert load_checkpoint(results / 'model_2.pth')['epoch'] == 2


class Left(Exception):
    """What the patched leave_process raises instead of ending the test process."""


@pytest.mark.parametrize('raised, status', [(None, 0), (UsageError('bad flag'), 2), (RuntimeError('crash'), 1)])
def test_a_process_that_joined_a_group_leaves_with_its_status_without_finalising(monkeypatch, capfd, raised, status):
    from core import cli
    left = []

    def leave(code):
        left.append(code)
        raise Left

    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setattr(processes, 'is_distributed', lambda: True)
    monkeypatch.setattr(processes, 'teardown', lambda: None)
    monkeypatch.setattr(processes, 'leave_process', leave)
    monkeypatch.setattr(cli.time, 'sleep', lambda seconds: None)

    def main():
        if raised is not None:
            raise raised
    with pytest.raises(Left):
        cli.run_main(main)
    assert left == [status]
    monkeypatch.setattr(processes, 'is_distributed', lambda: False)  # one process: the usual exit, no os._exit
    if raised is None:
        cli.run_main(main)
    else:
        with pytest.raises(SystemExit if status == 2 else Left):
            cli.run_main(main)
    capfd.readouterr()
