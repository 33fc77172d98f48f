"""Stage 0 (train_clean_encoder.py): flags, an end-to-end run, resume, refusals, non-finite loss."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

import train_clean_encoder as stage0
from common.cli import NonFiniteLossError, UsageError
from common.runs import epoch_loader
from datasets import ImagePairs, load_split, simclr_transform
from models import SimCLR, load_checkpoint, load_encoder

from conftest import run_script

TINY = ['--pretraining_dataset', 'synthetic_shapes', '--width', '8', '--batch_size', '64',
        '--device', 'cpu', '--no_progress']



@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    """64 training and 32 test images: two batches of 32 per epoch, for the multi-run tests."""
    from datasets.synthetic import make_synthetic
    from conftest import write_split
    root = tmp_path_factory.mktemp('small_data')
    for split, n, seed in (('train', 64, 11), ('test', 32, 12)):
        write_split(root / 'synthetic_shapes', split, *make_synthetic('synthetic_shapes', n, seed=seed))
    return root


def run_in_process(monkeypatch, *argv: str) -> None:
    """main() with a command line, in this process (saves the interpreter start-up of a subprocess)."""
    monkeypatch.setattr(sys, 'argv', ['train_clean_encoder.py', *argv])
    stage0.main()


def test_parser_has_the_original_flags_and_defaults():
    args = stage0.get_args_parser().parse_args([])
    assert (args.lr, args.batch_size, args.epochs) == (0.001, 256, 1000)
    assert (args.pretraining_dataset, args.suffix_encoder, args.results_dir) == ('cifar10', '', '')
    assert (args.seed, args.gpu, args.knn_t, args.knn_k) == (100, '0', 0.5, 200)
    assert (args.arch, args.width, args.save_freq) == ('resnet18', 64, 0)
    parsed = stage0.get_args_parser().parse_args(['--knn-t', '0.1', '--knn-k', '5',
                                                  '--pretraining_dataset', 'stl10'])
    assert (parsed.knn_t, parsed.knn_k, parsed.pretraining_dataset) == (0.1, 5, 'stl10')
    with pytest.raises(SystemExit):
        stage0.get_args_parser().parse_args(['--pretraining_dataset', 'gtsrb'])  # downstream only


@pytest.fixture(scope='module')
def finished_run(data_root, tmp_path_factory):
    """One epoch run as a user would, in a subprocess."""
    results = tmp_path_factory.mktemp('stage0') / 'run'
    result = run_script('train_clean_encoder.py', *TINY, '--epochs', '1', '--data_root', str(data_root),
                        '--results_dir', str(results), '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    return results, result


def test_end_to_end_writes_args_log_and_checkpoint(finished_run):
    results, result = finished_run
    printed = json.loads(result.stdout.splitlines()[0])  # the resolved arguments come first
    assert printed['epochs'] == 1 and printed['width'] == 8
    assert json.loads((results / 'args.json').read_text())['pretraining_dataset'] == 'synthetic_shapes'
    with open(results / 'log.csv', newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ['epoch', 'train_loss', 'test_acc@1'] and len(rows) == 1
    assert rows[0]['epoch'] == '1' and float(rows[0]['train_loss']) > 0
    assert 0 <= float(rows[0]['test_acc@1']) <= 100
    model, checkpoint = load_encoder(results / 'model_1.pth')
    assert (model.arch, model.width, checkpoint['epoch']) == ('resnet18', 8, 1)
    assert checkpoint['optimizer']['state'] and 'rng' in checkpoint
    assert checkpoint['args']['pretraining_dataset'] == 'synthetic_shapes'


def test_refuses_to_overwrite_an_earlier_run(monkeypatch, finished_run, data_root):
    results, _ = finished_run
    before = (results / 'model_1.pth').read_bytes(), (results / 'args.json').read_text()
    with pytest.raises(UsageError, match='model_1.pth.*--resume.*--overwrite'):
        run_in_process(monkeypatch, *TINY, '--epochs', '1', '--data_root', str(data_root),
                       '--results_dir', str(results), '--num_workers', '0')
    assert ((results / 'model_1.pth').read_bytes(), (results / 'args.json').read_text()) == before


def test_bad_epochs_is_a_one_line_error(data_root, tmp_path):
    result = run_script('train_clean_encoder.py', *TINY, '--epochs', '0', '--data_root', str(data_root),
                        '--results_dir', str(tmp_path / 'run'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ['error: --epochs must be at least 1, got 0']
    assert not (tmp_path / 'run').exists()


def test_batch_larger_than_the_training_set_is_refused(monkeypatch, data_root, tmp_path):
    with pytest.raises(UsageError, match='--batch_size 512.*fewer than one batch'):
        run_in_process(monkeypatch, *TINY, '--batch_size', '512', '--epochs', '1', '--data_root',
                       str(data_root), '--results_dir', str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_is_bit_identical_to_an_uninterrupted_run(monkeypatch, small_root, tmp_path, workers):
    common = [*TINY, '--batch_size', '32', '--data_root', str(small_root), '--num_workers', str(workers)]
    run_in_process(monkeypatch, *common, '--epochs', '2', '--results_dir', str(tmp_path / 'straight'))
    run_in_process(monkeypatch, *common, '--epochs', '1', '--results_dir', str(tmp_path / 'resumed'))
    run_in_process(monkeypatch, *common, '--epochs', '2', '--results_dir', str(tmp_path / 'resumed'), '--resume')
    straight = load_checkpoint(tmp_path / 'straight' / 'model_2.pth')
    resumed = load_checkpoint(tmp_path / 'resumed' / 'model_2.pth')
    assert straight['state_dict'].keys() == resumed['state_dict'].keys()
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    assert straight['log'] == resumed['log'] and [row['epoch'] for row in resumed['log']] == [1, 2]
    assert (tmp_path / 'resumed' / 'log.csv').read_text() == (tmp_path / 'straight' / 'log.csv').read_text()
    # the run did train: the weights moved away from those of epoch 1
    first = load_checkpoint(tmp_path / 'resumed' / 'model_1.pth')['state_dict']
    assert not torch.equal(first['f.f.0.weight'], resumed['state_dict']['f.f.0.weight'])


def test_suffix_encoder_architecture_wins(monkeypatch, small_root, tiny_encoder, tmp_path):
    run_in_process(monkeypatch, *TINY, '--width', '16', '--epochs', '1', '--save_freq', '1',
                   '--suffix_encoder', str(tiny_encoder), '--data_root', str(small_root),
                   '--results_dir', str(tmp_path / 'run'), '--num_workers', '0')
    model, checkpoint = load_encoder(tmp_path / 'run' / 'model_1.pth')
    start, _ = load_encoder(tiny_encoder)
    assert model.width == 8 and checkpoint['epoch'] == 1
    # started from the checkpoint's weights: one epoch moves them only a little
    drift = (model.f.f[0].weight - start.f.f[0].weight).norm() / start.f.f[0].weight.norm()
    assert 0 < drift < 0.5


def test_resume_without_checkpoint_is_refused(monkeypatch, data_root, tmp_path):
    with pytest.raises(UsageError, match='--resume: no checkpoint'):
        run_in_process(monkeypatch, *TINY, '--epochs', '1', '--data_root', str(data_root),
                       '--results_dir', str(tmp_path / 'run'), '--resume')


def test_non_finite_loss_stops_naming_epoch_and_step(small_root):
    images, _ = load_split('synthetic_shapes', 'train', small_root / 'synthetic_shapes')
    pairs = ImagePairs(images, simclr_transform(((0.5,) * 3, (0.25,) * 3)))
    loader = epoch_loader(pairs, batch_size=32, shuffle=True, drop_last=True, num_workers=0, seed=0, epoch=3,
                          device=torch.device('cpu'))
    model = SimCLR(width=8)
    with torch.no_grad():
        model.g[3].bias.fill_(float('nan'))
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(NonFiniteLossError, match='epoch 3, step 0'):
        stage0.train_one_epoch(model, loader, optimizer, 0.5, 3, torch.device('cpu'), False, True)
