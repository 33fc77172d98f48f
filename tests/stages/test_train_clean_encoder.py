"""Stage 0 (train_clean_encoder.py): flags, an end-to-end run, resume, refusals, non-finite loss."""
from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
import torch

import train_clean_encoder as stage0
from common.runs import check_resumable
from core.cli import resume_flags
from core.errors import NonFiniteLossError, UsageError
from datasets import ImagePairs, load_split, simclr_transform
from datasets.loaders import epoch_loader
from models import SimCLR, load_checkpoint, load_encoder

from conftest import run_in_process, run_script

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


def call_main(monkeypatch, *argv: str) -> None:
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
    assert (args.optimizer, args.momentum, args.weight_decay, args.schedule, args.warmup_epochs) == (
        'adam', 0.9, 1e-6, 'constant', 0)
    assert args.crop_min_scale == 0.08  # torchvision's RandomResizedCrop, as the paper's code


def test_learning_rate_by_hand():
    lr = stage0.learning_rate
    assert [lr(epoch, 0.001, 1000) for epoch in (1, 500, 1000)] == [0.001] * 3  # the default: constant
    assert [lr(epoch, 0.2, 10, 'constant', 4) for epoch in range(1, 7)] == [0.05, 0.1, 0.15000000000000002, 0.2,
                                                                            0.2, 0.2]
    # cosine over E = 4 epochs, no warm-up: base · (1 + cos(π (epoch - 1) / 4)) / 2
    expected = [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert [lr(epoch, 1.0, 4, 'cosine') for epoch in range(1, 5)] == pytest.approx(expected, abs=1e-15)
    # E = 10, W = 2: 0.05, 0.1 (warm-up), then the cosine over the 8 epochs left, starting at the full rate
    cosine = [lr(epoch, 0.1, 10, 'cosine', 2) for epoch in range(1, 11)]
    assert cosine[:3] == [0.05, 0.1, 0.1]
    assert cosine[6] == pytest.approx(0.05, abs=1e-15)  # epoch 7: (1 + cos(π/2)) / 2
    assert cosine[9] == pytest.approx(0.1 * (1 + math.cos(7 * math.pi / 8)) / 2, abs=1e-15)
    assert all(a > b > 0 for a, b in zip(cosine[2:], cosine[3:]))


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
    recorded = json.loads((results / 'args.json').read_text())
    assert recorded['pretraining_dataset'] == 'synthetic_shapes'
    assert recorded['environment']['cpu_threads'] == 1  # run_script's OMP_NUM_THREADS=1
    with open(results / 'log.csv', newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ['epoch', 'train_loss', 'test_acc@1'] and len(rows) == 1
    assert rows[0]['epoch'] == '1' and float(rows[0]['train_loss']) > 0
    assert 0 <= float(rows[0]['test_acc@1']) <= 100
    model, checkpoint = load_encoder(results / 'model_1.pth')
    assert (model.arch, model.width, checkpoint['epoch']) == ('resnet18', 8, 1)
    assert checkpoint['optimizer']['state'] and 'rng' in checkpoint
    assert checkpoint['args']['pretraining_dataset'] == 'synthetic_shapes'
    # the defaults are the paper's optimiser: Adam, lr 1e-3, weight decay 1e-6
    group = checkpoint['optimizer']['param_groups'][0]
    assert 'betas' in group and 'momentum' not in group and (group['lr'], group['weight_decay']) == (0.001, 1e-6)


def test_refuses_to_overwrite_an_earlier_run(monkeypatch, finished_run, data_root):
    results, _ = finished_run
    before = (results / 'model_1.pth').read_bytes(), (results / 'args.json').read_text()
    with pytest.raises(UsageError, match='model_1.pth.*--resume.*--overwrite'):
        call_main(monkeypatch, *TINY, '--epochs', '1', '--data_root', str(data_root),
                  '--results_dir', str(results), '--num_workers', '0')
    assert ((results / 'model_1.pth').read_bytes(), (results / 'args.json').read_text()) == before


def test_bad_epochs_is_a_one_line_error(data_root, tmp_path):
    result = run_in_process('train_clean_encoder.py', *TINY, '--epochs', '0', '--data_root', str(data_root),
                            '--results_dir', str(tmp_path / 'run'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ['error: --epochs must be at least 1, got 0']
    assert not (tmp_path / 'run').exists()


def test_batch_larger_than_the_training_set_is_refused(monkeypatch, data_root, tmp_path):
    with pytest.raises(UsageError, match='--batch_size 512.*fewer than one batch'):
        call_main(monkeypatch, *TINY, '--batch_size', '512', '--epochs', '1', '--data_root',
                  str(data_root), '--results_dir', str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_is_bit_identical_to_an_uninterrupted_run(monkeypatch, small_root, tmp_path, workers):
    common = [*TINY, '--batch_size', '32', '--data_root', str(small_root), '--num_workers', str(workers)]
    call_main(monkeypatch, *common, '--epochs', '2', '--results_dir', str(tmp_path / 'straight'))
    call_main(monkeypatch, *common, '--epochs', '1', '--results_dir', str(tmp_path / 'resumed'))
    call_main(monkeypatch, *common, '--epochs', '2', '--results_dir', str(tmp_path / 'resumed'), '--resume')
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


CTRL_RECIPE = ['--optimizer', 'sgd', '--lr', '0.06', '--momentum', '0.9', '--weight_decay', '5e-4',
               '--schedule', 'cosine', '--warmup_epochs', '2']


def test_sgd_cosine_warmup_resume_is_bit_identical(monkeypatch, small_root, tmp_path):
    """A run killed after epoch 2 (its directory holds model_2.pth) and resumed ends as the uninterrupted run."""
    base = [*TINY, '--batch_size', '32', '--data_root', str(small_root), '--num_workers', '0']
    common = [*base, '--epochs', '4', *CTRL_RECIPE]
    call_main(monkeypatch, *common, '--save_freq', '1', '--results_dir', str(tmp_path / 'straight'))
    (tmp_path / 'killed').mkdir()
    shutil.copy(tmp_path / 'straight' / 'model_2.pth', tmp_path / 'killed' / 'model_2.pth')
    call_main(monkeypatch, *common, '--results_dir', str(tmp_path / 'killed'), '--resume')
    straight = load_checkpoint(tmp_path / 'straight' / 'model_4.pth')
    resumed = load_checkpoint(tmp_path / 'killed' / 'model_4.pth')
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    assert straight['log'] == resumed['log'] and [row['epoch'] for row in resumed['log']] == [1, 2, 3, 4]
    # SGD with momentum at the scheduled rate of each epoch: warm-up 0.06 · 1/2, 0.06 · 2/2, then the cosine over
    # the 2 epochs left: 0.06 · (1 + cos(0)) / 2, 0.06 · (1 + cos(π/2)) / 2
    for epoch, rate in ((1, 0.03), (2, 0.06), (3, 0.06), (4, 0.03)):
        group = load_checkpoint(tmp_path / 'straight' / f'model_{epoch}.pth')['optimizer']['param_groups'][0]
        assert (group['momentum'], group['weight_decay']) == (0.9, 5e-4) and group['lr'] == pytest.approx(rate)
    assert all('momentum_buffer' in state for state in resumed['optimizer']['state'].values())

    # a cosine schedule depends on --epochs, so extending the run is refused; so is another optimiser
    with pytest.raises(UsageError, match="--epochs 4 -> 5"):
        call_main(monkeypatch, *base, '--epochs', '5', *CTRL_RECIPE, '--results_dir', str(tmp_path / 'killed'),
                  '--resume')
    with pytest.raises(UsageError, match="--optimizer 'sgd' -> 'adam'"):
        call_main(monkeypatch, *base, '--epochs', '5', '--lr', '0.06', '--results_dir', str(tmp_path / 'killed'),
                  '--resume')


def test_checkpoints_from_before_the_recipe_flags_resume_with_their_defaults(tmp_path):
    """A flag the checkpoint does not record did not exist when it was written: it compares as its default."""
    parser = stage0.get_args_parser()
    args, must_match = parser.parse_args([]), resume_flags(parser)
    recipe = ('optimizer', 'momentum', 'weight_decay', 'schedule', 'warmup_epochs', 'crop_min_scale')
    assert set(recipe) <= set(must_match)
    recorded = {key: value for key, value in vars(args).items() if key not in recipe}
    check_resumable({'args': recorded, 'rng': {}}, args, tmp_path / 'model_1.pth', must_match)
    with pytest.raises(UsageError, match="--optimizer 'sgd' -> 'adam'"):
        check_resumable({'args': {**recorded, 'optimizer': 'sgd'}, 'rng': {}}, args, tmp_path / 'model_1.pth',
                        must_match)


@pytest.mark.parametrize('flags, message', [
    (['--warmup_epochs', '2'], r'--warmup_epochs must lie in 0..1 \(fewer than --epochs\), got 2'),
    (['--warmup_epochs', '-1'], '--warmup_epochs must lie in 0..1'),
    (['--momentum', '1'], r'--momentum must lie in \[0, 1\), got 1.0'),
    (['--weight_decay=-1e-4'], '--weight_decay must be 0 or positive'),
    (['--crop_min_scale', '0'], r'--crop_min_scale must lie in \(0, 1\], got 0.0'),
    (['--crop_min_scale', '1.5'], r'--crop_min_scale must lie in \(0, 1\], got 1.5'),
])
def test_bad_recipe_flags_are_refused_before_anything_is_written(monkeypatch, data_root, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        call_main(monkeypatch, *TINY, '--epochs', '2', '--data_root', str(data_root),
                  '--results_dir', str(tmp_path / 'run'), *flags)
    assert not (tmp_path / 'run').exists()
    with pytest.raises(SystemExit):
        stage0.get_args_parser().parse_args(['--optimizer', 'lamb'])


def test_suffix_encoder_architecture_wins(monkeypatch, small_root, tiny_encoder, tmp_path):
    call_main(monkeypatch, *TINY, '--width', '16', '--epochs', '1', '--save_freq', '1',
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
        call_main(monkeypatch, *TINY, '--epochs', '1', '--data_root', str(data_root),
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
    with pytest.raises(NonFiniteLossError, match='epoch 3, step 1'):
        stage0.train_one_epoch(model, loader, optimizer, 0.5, 3, torch.device('cpu'), False, True)
