"""common, core and evaluation.features: device resolution, RNG states through checkpoints, run directories, CSV
logs, kNN monitor, error handling of the stage scripts."""
from __future__ import annotations

import argparse
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.cli import check_finite, data_dir_for, progress_disabled, require_positive, seed_everything, shared_parser
from common import runs
from common.runs import (checkpoint_epochs, prepare_results_dir, read_csv, restore_optimizer, write_args,
                         rng_state, set_rng_state, write_csv, write_json)
from conftest import REPO, requires_cpu_fused_adam, run_script
from core.cli import caused_by_interrupt, one_line, run_main
from core.device import autocast, resolve_device
from core.errors import NonFiniteLossError, UsageError
from core.files import default_file_mode
from datasets import DataError
from datasets.loaders import epoch_loader
from evaluation.features import encode_images, knn_accuracies, knn_classify, knn_monitor
from models import CheckpointError, load_checkpoint, save_atomic

sys.path.insert(0, str(REPO / 'scripts'))
from bench_tools import counting_forwards  # noqa: E402


# --- device --------------------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


def test_resolve_device_cpu(no_cuda):
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cpu')
    assert resolve_device('auto', gpu='3') == torch.device('cpu')


@pytest.mark.parametrize('device', ['gpu', 'CUDA', 'cuda:', 'cuda:x', 'cuda:-1', 'tpu', ''])
def test_resolve_device_bad_strings(device):
    with pytest.raises(UsageError, match='--device'):
        resolve_device(device)


@pytest.mark.parametrize('device', ['cuda', 'cuda:0', 'cuda:1'])
def test_resolve_device_cuda_unavailable(no_cuda, device):
    with pytest.raises(UsageError, match='not available'):
        resolve_device(device)


def test_resolve_device_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('auto', gpu='1') == torch.device('cuda:1')
    assert resolve_device('cuda', gpu='1,0') == torch.device('cuda:1')
    assert resolve_device('cuda:0', gpu='1') == torch.device('cuda:0')
    with pytest.raises(UsageError, match='only 2'):
        resolve_device('cuda:2')


def test_autocast_is_a_no_op_on_the_cpu():
    with autocast(torch.device('cpu')):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# --- RNG states ----------------------------------------------------------------------------------

def draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    seed_everything(7)
    draw()  # leaves python mid-stream and numpy holding a cached gaussian
    assert np.random.get_state()[3] == 1
    path = tmp_path / 'model_1.pth'
    save_atomic({'epoch': 1, 'state_dict': {}, 'optimizer': {}, 'rng': rng_state()}, path)
    expected = draw()
    seed_everything(123)  # anything else
    assert draw() != expected
    set_rng_state(load_checkpoint(path)['rng'])
    assert draw() == expected


def test_seed_everything_reproduces():
    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first


# --- run directories -----------------------------------------------------------------------------

def run_args(results_dir, resume=False, overwrite=False) -> argparse.Namespace:
    return argparse.Namespace(results_dir=str(results_dir), resume=resume, overwrite=overwrite)


def touch_checkpoints(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_atomic({'epoch': 0, 'state_dict': {}, 'optimizer': {}}, folder / name)


def test_checkpoint_epochs_tells_the_two_naming_styles_apart(tmp_path):
    touch_checkpoints(tmp_path, 'model_1.pth', 'model_20.pth', 'model_3.pth', 'model5.pth', 'model100.pth',
                      'model_x.pth', 'model_.pth', 'other_2.pth', 'model_7.pth.tmp', 'amodel_4.pth')
    underscore = checkpoint_epochs(tmp_path, 'model_{}.pth')
    assert underscore == [(1, tmp_path / 'model_1.pth'), (3, tmp_path / 'model_3.pth'),
                          (20, tmp_path / 'model_20.pth')]
    assert checkpoint_epochs(tmp_path, 'model{}.pth') == [(5, tmp_path / 'model5.pth'),
                                                          (100, tmp_path / 'model100.pth')]
    assert checkpoint_epochs(tmp_path / 'absent', 'model_{}.pth') == []


def test_prepare_results_dir_creates_a_fresh_folder(tmp_path):
    results = tmp_path / 'run' / 'sub'
    assert prepare_results_dir(run_args(results), 'model_{}.pth') is None
    assert results.is_dir()
    assert prepare_results_dir(run_args(results), 'model_{}.pth') is None  # empty: fine again


def test_prepare_results_dir_refuses_to_clobber(tmp_path):
    touch_checkpoints(tmp_path, 'model_9.pth', 'model_10.pth')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UsageError) as error:
        prepare_results_dir(run_args(tmp_path), 'model_{}.pth')
    message = str(error.value)
    assert str(tmp_path) in message and 'model_10.pth' in message and '--resume' in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert prepare_results_dir(run_args(tmp_path, overwrite=True), 'model_{}.pth') is None
    # another stage's naming does not count as a clash
    assert prepare_results_dir(run_args(tmp_path), 'model{}.pth') is None


def test_resume_finds_the_latest_checkpoint(tmp_path):
    touch_checkpoints(tmp_path, 'model_9.pth', 'model_10.pth', 'model_2.pth', 'model50.pth')
    assert prepare_results_dir(run_args(tmp_path, resume=True), 'model_{}.pth') == tmp_path / 'model_10.pth'
    assert prepare_results_dir(run_args(tmp_path, resume=True), 'model{}.pth') == tmp_path / 'model50.pth'


def test_resume_without_checkpoints(tmp_path):
    with pytest.raises(UsageError, match='--resume'):
        prepare_results_dir(run_args(tmp_path, resume=True), 'model_{}.pth')


def test_results_dir_required_and_must_be_a_folder(tmp_path):
    with pytest.raises(UsageError, match='--results_dir'):
        prepare_results_dir(run_args(''), 'model_{}.pth')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UsageError, match='not a folder'):
        prepare_results_dir(run_args(tmp_path / 'file'), 'model_{}.pth')


# --- logs ----------------------------------------------------------------------------------------

def test_csv_round_trip(tmp_path):
    rows = [{'epoch': 1, 'train_loss': 4.25, 'test_acc@1': 10.5}, {'epoch': 2, 'train_loss': 3.5, 'test_acc@1': 12.0}]
    path = tmp_path / 'log.csv'
    write_csv(path, rows)
    assert path.read_text().splitlines()[0] == 'epoch,train_loss,test_acc@1'
    back = read_csv(path)
    assert [{k: float(v) for k, v in row.items()} for row in back] == rows
    write_csv(path, rows[:1])  # rewritten, not appended
    assert len(read_csv(path)) == 1
    assert read_csv(tmp_path / 'absent.csv') == []
    assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['log.csv']


def test_write_json(tmp_path):
    import json
    write_json(tmp_path / 'args.json', {'lr': 0.01, 'path': tmp_path})
    assert json.loads((tmp_path / 'args.json').read_text()) == {'lr': 0.01, 'path': str(tmp_path)}


def test_write_args_records_the_flags_and_the_thread_count(tmp_path):
    import json
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        write_args(tmp_path, argparse.Namespace(lr=0.01, seed=3))
    finally:
        torch.set_num_threads(threads)
    recorded = json.loads((tmp_path / 'args.json').read_text())
    environment = recorded['environment']
    assert recorded == {'lr': 0.01, 'seed': 3, 'environment': {
        'code': runs.code_version(), 'started': environment['started'], 'torch': torch.__version__,
        'cpu_threads': 1, 'world_size': 1, 'cpu': environment['cpu'],
        'cpu_capability': torch.backends.cpu.get_cpu_capability()}}
    assert isinstance(environment['cpu'], str) and environment['started'].endswith('+00:00')
    assert re.fullmatch(r'([0-9a-f]{12}(-dirty)?)?', environment['code'])


@pytest.mark.process
def test_code_version_names_the_commit_and_a_changed_checkout(tmp_path):
    version = runs.code_version.__wrapped__  # uncached: the checkout changes between the calls
    assert version(tmp_path) == ''  # not a git checkout
    git = ['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run([*git, 'init', '-q'], check=True, timeout=60)
    (tmp_path / 'a.py').write_text('x = 1\n')
    subprocess.run([*git, 'add', 'a.py'], check=True, timeout=60)
    subprocess.run([*git, 'commit', '-qm', 'one'], check=True, timeout=60)
    head = subprocess.run([*git, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=60).stdout.strip()
    assert version(tmp_path) == head[:12]
    (tmp_path / 'b.py').write_text('untracked\n')
    assert version(tmp_path) == head[:12]  # an untracked file changes no code that ran
    (tmp_path / 'a.py').write_text('x = 2\n')
    assert version(tmp_path) == head[:12] + '-dirty'
    (tmp_path / 'copy').mkdir()  # a copy of the code inside another checkout is not that checkout's commit
    assert version(tmp_path / 'copy') == ''


def test_cpu_name_reads_the_model_name_of_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 106\n'
                       'model name\t: Intel(R) Xeon(R) Gold 6338 CPU\n\nprocessor\t: 1\nmodel name\t: other\n')
    real_path = runs.Path
    monkeypatch.setattr(runs, 'Path', lambda name: cpuinfo if name == '/proc/cpuinfo' else real_path(name))
    assert runs.cpu_name() == 'Intel(R) Xeon(R) Gold 6338 CPU (family 6, model 106)'
    cpuinfo.write_text('processor\t: 0\nmodel name\t: AMD EPYC\n')
    assert runs.cpu_name() == 'AMD EPYC'
    cpuinfo.write_text('processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU architecture: 8\n'
                       'CPU part\t: 0xd40\n\nprocessor\t: 1\nCPU part\t: 0xd0c\n')  # ARM: no model name
    assert runs.cpu_name() == 'ARM (implementer 0x41, part 0xd40)'
    monkeypatch.setattr(runs, 'Path', lambda name: tmp_path / 'absent')
    monkeypatch.setattr(runs.platform, 'processor', lambda: 'arm')
    assert runs.cpu_name() == 'arm'


# --- epoch loader --------------------------------------------------------------------------------

def loader_order(seed, epoch):
    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    loader = epoch_loader(dataset, batch_size=6, shuffle=True, drop_last=True, num_workers=0, seed=seed,
                          epoch=epoch, device=torch.device('cpu'))
    return [batch[0].tolist() for batch in loader]


def test_epoch_loader_order_depends_only_on_seed_and_epoch():
    first = loader_order(1, 3)
    torch.manual_seed(999)  # the global RNG has no say
    assert loader_order(1, 3) == first
    assert len(first) == 3 and all(len(b) == 6 for b in first)  # the partial batch is dropped
    assert loader_order(1, 4) != first and loader_order(2, 3) != first


# --- features and the kNN monitor ----------------------------------------------------------------

class MeanColour(nn.Module):
    """A hand-built 'encoder': the mean of each channel (B, 3, H, W) -> (B, 3)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def colour_images(classes, per_class, seed):
    """Class c is a noisy image of primary colour c (red, green, blue): linearly separable features."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    base = np.zeros((len(y), 32, 32, 3))
    base[np.arange(len(y)), :, :, y] = 200
    x = np.clip(base + rng.normal(0, 20, base.shape) + 30, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_encode_images_normalises_and_restores_the_mode():
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.train()
    x, _ = colour_images(3, 5, seed=0)
    features = encode_images(encoder, x, NORMALIZATION, torch.device('cpu'), batch_size=4, disable_progress=True)
    assert features.shape == (15, 4)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(15))
    assert encoder.training
    encoder.eval()
    assert not encode_images(encoder, x, NORMALIZATION, torch.device('cpu'), disable_progress=True).isnan().any()
    assert not encoder.training


def test_knn_monitor_on_separable_features():
    memory = colour_images(3, 10, seed=1)
    test_x, test_y = colour_images(3, 6, seed=2)
    cpu = torch.device('cpu')
    accuracy = knn_monitor(MeanColour(), memory, test_x, test_y, NORMALIZATION, classes=3, knn_k=5, knn_t=0.5,
                           device=cpu, disable_progress=True)
    assert accuracy == pytest.approx(100.0)
    # a constant label turns the accuracy into the rate of images sent to that label (ASR-style)
    rate = knn_monitor(MeanColour(), memory, test_x, np.zeros_like(test_y), NORMALIZATION, 3, 5, 0.5, cpu,
                       disable_progress=True)
    assert rate == pytest.approx(100 / 3)
    # a bank whose labels are rotated makes every prediction wrong
    wrong = knn_monitor(MeanColour(), (memory[0], (memory[1] + 1) % 3), test_x, test_y, NORMALIZATION, 3, 5,
                        0.5, cpu, disable_progress=True)
    assert wrong == 0.0


def test_knn_accuracies_encode_the_bank_once_for_every_query_set():
    memory = colour_images(3, 10, seed=1)
    test_x, test_y = colour_images(3, 6, seed=2)
    encoder, cpu = MeanColour(), torch.device('cpu')
    with counting_forwards(encoder) as seen:
        accuracies = knn_accuracies(encoder, memory, [(test_x, test_y), (test_x, np.zeros_like(test_y))],
                                    NORMALIZATION, 3, 5, 0.5, cpu, disable_progress=True)
    assert accuracies == [pytest.approx(100.0), pytest.approx(100 / 3)]
    assert seen['images'] == len(memory[0]) + 2 * len(test_x)


def test_knn_classify_in_batches():
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(50) % 5
    whole = knn_classify(bank, labels, bank[:30], 5, 1, 0.5)
    assert torch.equal(whole, labels[:30])  # each query's nearest neighbour is itself
    assert torch.equal(knn_classify(bank, labels, bank[:30], 5, 1, 0.5, batch_size=7), whole)


# --- shared parser and error handling ------------------------------------------------------------

def test_shared_parser_defaults_and_data_dirs():
    parser = argparse.ArgumentParser(parents=[shared_parser()])
    args = parser.parse_args([])
    assert (args.seed, args.gpu, args.device, args.data_root, args.results_dir) == (100, '0', 'auto', 'data', '')
    assert not (args.resume or args.overwrite or args.amp or args.no_progress)
    assert str(data_dir_for(args, 'cifar10')) == 'data/cifar10'
    args = parser.parse_args(['--data_dir', 'here', '--data_root', 'root'])
    assert str(data_dir_for(args, 'cifar10')) == 'here'
    assert str(data_dir_for(args, 'gtsrb', primary=False)) == 'root/gtsrb'
    for action in shared_parser()._actions:
        assert action.help, action.dest


def test_progress_disabled(monkeypatch):
    monkeypatch.delenv('TQDM_DISABLE', raising=False)
    assert progress_disabled(argparse.Namespace(no_progress=True))
    assert not progress_disabled(argparse.Namespace(no_progress=False))
    monkeypatch.setenv('TQDM_DISABLE', '1')
    assert progress_disabled(argparse.Namespace(no_progress=False))


def test_check_finite_and_require_positive():
    check_finite(torch.tensor(1.5), 1, 2)
    for bad in (float('nan'), float('inf')):
        with pytest.raises(NonFiniteLossError, match='epoch 3, step 4'):
            check_finite(torch.tensor(bad), 3, 4)
    require_positive('--epochs', 1)
    with pytest.raises(UsageError, match='--epochs'):
        require_positive('--epochs', 0)


def raiser(error):
    def main():
        raise error
    return main


@pytest.mark.parametrize('error, status', [
    (DataError('data/cifar10/train.npz: no such file'), 2),
    (CheckpointError('model.pth: refused to load'), 2),
    (UsageError('--ratio must lie in (0, 1]'), 2),
    (NonFiniteLossError('non-finite loss'), 3),
])
def test_run_main_turns_expected_errors_into_one_line(capsys, error, status):
    with pytest.raises(SystemExit) as exit_info:
        run_main(raiser(error))
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err == f'error: {error}\n'


def test_run_main_keeps_multi_line_messages_on_one_line(capsys):
    with pytest.raises(SystemExit):
        run_main(raiser(DataError('x.npz: not readable (first\nsecond\n)')))
    assert capsys.readouterr().err == 'error: x.npz: not readable (first second )\n'
    assert one_line(ValueError('a\n\n  b ')) == 'a b'


def test_run_main_lets_bugs_through():
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)


@pytest.mark.process
def test_run_main_as_a_user_sees_it(tmp_path):
    script = tmp_path / 'stage.py'
    script.write_text('from core.cli import run_main\n'
                      'from datasets import load_split\n'
                      f'run_main(lambda: load_split("cifar10", "train", {str(tmp_path)!r}))\n')
    result = run_script(str(script), timeout=120)
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: ') and 'train.npz' in result.stderr and 'prepare' in result.stderr
    assert result.stdout == ''


def test_caused_by_interrupt_follows_the_exception_chain():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError('unexpected pos 1279168 vs 1279056')  # a library's cleanup failing
    except RuntimeError as error:
        assert caused_by_interrupt(error)
    assert caused_by_interrupt(KeyboardInterrupt())
    assert not caused_by_interrupt(RuntimeError('a bug'))


@pytest.mark.parametrize('failing_main', [
    # a Ctrl-C whose traceback a library's cleanup replaced (torch.save's zip writer did)
    ('def main():\n'
     '    try:\n'
     '        raise KeyboardInterrupt\n'
     '    finally:\n'
     '        raise RuntimeError("enforce fail: unexpected pos")\n'),
    # a Ctrl-C inside torch.load surfaces as CheckpointError('not readable', from None)
    ('from models import CheckpointError\n'
     'def main():\n'
     '    try:\n'
     '        raise KeyboardInterrupt\n'
     '    except Exception:\n'
     '        pass\n'
     '    except BaseException:\n'
     '        raise CheckpointError("model.pth: not a readable PyTorch checkpoint") from None\n'),
], ids=['cleanup_error', 'expected_error'])
@pytest.mark.process
def test_an_error_raised_by_an_interrupt_is_the_interrupt(tmp_path, failing_main):
    """One line and exit 130, not the error the interrupt caused."""
    script = tmp_path / 'stage.py'
    script.write_text('from core.cli import run_main\n' + failing_main + 'run_main(main)\n')
    result = run_script(str(script), timeout=120)
    assert result.returncode == 130
    assert result.stderr.startswith('interrupted: ') and result.stderr.count('\n') == 1
    assert 'not a readable' not in result.stderr


def test_restore_optimizer_loads_the_state_but_keeps_the_optimisers_own_implementation():
    """A checkpoint of foreach Adam loads into fused Adam (another device's choice): state and epoch from the
    checkpoint, fused/foreach from the optimiser that resumes."""
    weight = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.Adam([weight], lr=0.5, foreach=True)
    weight.grad = torch.ones(3)
    saved.step()
    resumed = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1, foreach=False, fused=False)
    resumed.param_groups[0]['fused'] = True  # as a CUDA probe's Adam, without needing a fused kernel here
    epoch = restore_optimizer(resumed, {'optimizer': saved.state_dict(), 'epoch': 7}, Path('p.pth'))
    group = resumed.param_groups[0]
    assert epoch == 7 and group['lr'] == 0.5 and group['fused'] is True and group['foreach'] is False
    assert torch.equal(next(iter(resumed.state.values()))['exp_avg'], next(iter(saved.state.values()))['exp_avg'])


@requires_cpu_fused_adam
def test_a_foreach_checkpoint_resumes_into_fused_adam_and_steps_as_an_uninterrupted_fused_run():
    """The cross-device resume of the probe (foreach on the CPU, fused on CUDA), here with the CPU's fused Adam
    (torch >= 2.4): the resumed optimiser steps, within rounding of the run that was never interrupted."""

    def steps(weight, optimizer, count):
        for _ in range(count):
            weight.grad = weight.detach() * 2 - 1
            optimizer.step()

    uninterrupted = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    steps(uninterrupted, torch.optim.Adam([uninterrupted], lr=0.1, fused=True), 4)
    first = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    saved = torch.optim.Adam([first], lr=0.1, foreach=True)
    steps(first, saved, 2)
    resumed_weight = torch.nn.Parameter(first.detach().clone())
    resumed = torch.optim.Adam([resumed_weight], lr=0.1, fused=True)
    assert restore_optimizer(resumed, {'optimizer': saved.state_dict(), 'epoch': 2}, Path('p.pth')) == 2
    assert resumed.param_groups[0]['fused'] is True
    steps(resumed_weight, resumed, 2)
    assert torch.allclose(resumed_weight, uninterrupted, rtol=0, atol=1e-6)


def test_the_recorded_pretraining_set_is_the_runs_usage_info_else_its_pretraining_set():
    from common.encoders import recorded_pretraining_set
    assert recorded_pretraining_set({'args': {'encoder_usage_info': 'stl10', 'pretraining_dataset': 'cifar10'}}) \
        == 'stl10'
    assert recorded_pretraining_set({'args': {'encoder_usage_info': 'CLIP', 'pretraining_dataset': 'cifar10'}}) \
        == 'cifar10'  # CLIP names a family, not a set
    assert recorded_pretraining_set({'args': None}) is None and recorded_pretraining_set({}) is None


def test_one_encoder_loader_warns_once_when_the_stage_names_another_set(tiny_encoder, capsys):
    """The warning names the file, the set its run recorded, the stage's flag and the set the inputs are normalised
    as; a file that records no set, or the same set, loads silently."""
    from common.encoders import load_encoder
    from models import SimCLR, save_atomic
    from models.checkpoint import encoder_checkpoint
    path = tiny_encoder.parent / 'recorded.pth'
    save_atomic({**encoder_checkpoint(SimCLR(width=8), None, 1), 'args': {'pretraining_dataset': 'stl10'}}, path)
    args = argparse.Namespace(arch='resnet18', encoder_usage_info=None)
    encoder, checkpoint = load_encoder(str(path), args, '--pretraining_dataset', 'stl10')
    assert isinstance(encoder, SimCLR) and checkpoint['args'] == {'pretraining_dataset': 'stl10'}
    assert capsys.readouterr().err == ''
    load_encoder(str(path), args, '--pretraining_dataset', 'cifar10')
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {path} records the pre-training set 'stl10', but --pretraining_dataset is 'cifar10': "
                   f"its inputs are normalised as 'cifar10'"]
    load_encoder(str(tiny_encoder), args, '--pretraining_dataset', 'cifar10')  # records nothing: no warning
    assert capsys.readouterr().err == ''
