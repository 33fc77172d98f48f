"""datasets/poison.py (a poisoned copy of a pre-training split) and stage 0 trained on it."""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

import train_clean_encoder as stage0
from conftest import run_script
from core.errors import UsageError
from datasets import DataError, apply_trigger, load_split, load_trigger
from datasets import poison
from models import load_encoder
from trigger import make_trigger


@pytest.fixture(scope='module')
def ctrl_trigger(tmp_path_factory):
    path = tmp_path_factory.mktemp('ctrl') / 'ctrl.npz'
    make_trigger.main(['--kind', 'ctrl', '--out', str(path)])
    return path


def poison_args(data_root, trigger, out, *extra):
    return ['--dataset', 'synthetic_shapes', '--trigger_file', str(trigger), '--target_class', '3',
            '--poison_rate', '0.05', '--seed', '1', '--out', str(out), '--data_root', str(data_root), *extra]


def test_poison_count_rounds_halves_up():
    assert poison.poison_count(0.01, 50000) == 500  # CTRL's 1% of CIFAR10
    assert poison.poison_count(0.05, 256) == 13  # 12.8
    assert poison.poison_count(0.5, 5) == 3  # 2.5: up, not to even
    assert poison.poison_count(0.1, 4) == 0  # 0.4


def test_choose_poisoned_draws_only_the_target_class():
    labels = np.array([0, 1, 1, 0, 1, 1, 2])
    draws = {tuple(poison.choose_poisoned(labels, 1, 2, seed)) for seed in range(20)}
    assert all(len(set(d)) == 2 and set(d) <= {1, 2, 4, 5} and list(d) == sorted(d) for d in draws)
    assert len(draws) > 1  # the seed matters ...
    assert np.array_equal(poison.choose_poisoned(labels, 1, 2, 5), poison.choose_poisoned(labels, 1, 2, 5))  # ... alone
    assert poison.choose_poisoned(labels, 1, 4, 0).tolist() == [1, 2, 4, 5]
    with pytest.raises(DataError, match='class 2 has 1 images in the split, fewer than the 2 to poison'):
        poison.choose_poisoned(labels, 2, 2, 0)


def test_poison_images_triggers_only_the_chosen(trigger_file):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    before = images.copy()
    out = poison.poison_images(images, np.array([1, 3]), load_trigger(trigger_file))
    assert np.array_equal(images, before)
    assert np.array_equal(out[[0, 2, 4]], images[[0, 2, 4]])
    assert (out[[1, 3], 21:31, 21:31] == 255).all() and np.array_equal(out[[1, 3], :21], images[[1, 3], :21])


@pytest.mark.process
def test_poison_as_a_user_writes_the_copy_and_its_record(tmp_path, data_root, ctrl_trigger):
    out = tmp_path / 'poisoned'
    result = run_script('-m', 'datasets.poison', *poison_args(data_root, ctrl_trigger, out))
    assert result.returncode == 0, result.stderr
    source = data_root / 'synthetic_shapes'
    x, y = load_split('synthetic_shapes', 'train', source)
    px, py = load_split('synthetic_shapes', 'train', out)
    record = json.loads((out / 'poison.json').read_text())
    indices = np.array(record['indices'])
    assert record['count'] == len(indices) == 13 and len(set(indices.tolist())) == 13  # round(0.05 · 256)
    assert (y[indices] == 3).all() and np.array_equal(py, y)
    np.testing.assert_array_equal(px[indices], apply_trigger(x[indices], load_trigger(ctrl_trigger)))
    clean = np.setdiff1d(np.arange(len(x)), indices)
    np.testing.assert_array_equal(px[clean], x[clean])
    assert not np.array_equal(px[indices], x[indices])
    assert (out / 'test.npz').read_bytes() == (source / 'test.npz').read_bytes()
    assert record['trigger_sha256'] == hashlib.sha256(ctrl_trigger.read_bytes()).hexdigest()
    assert (record['dataset'], record['split'], record['target_class'], record['poison_rate'], record['seed']) == (
        'synthetic_shapes', 'train', 3, 0.05, 1)
    assert record['trigger_file'] == str(ctrl_trigger) and record['trigger_info'][0] == 'ctrl'
    assert sorted(path.name for path in out.iterdir()) == ['poison.json', 'test.npz', 'train.npz']

    # the same seed draws the same images; another seed others
    poison.main(poison_args(data_root, ctrl_trigger, tmp_path / 'again'))
    poison.main([*poison_args(data_root, ctrl_trigger, tmp_path / 'other')[:-4], '--seed', '2',
                 '--out', str(tmp_path / 'other'), '--data_root', str(data_root)])
    assert json.loads((tmp_path / 'again' / 'poison.json').read_text())['indices'] == record['indices']
    assert json.loads((tmp_path / 'other' / 'poison.json').read_text())['indices'] != record['indices']


def test_stage0_trains_on_the_poisoned_copy(monkeypatch, tmp_path, data_root, ctrl_trigger):
    out = tmp_path / 'poisoned'
    poison.main(poison_args(data_root, ctrl_trigger, out))
    monkeypatch.setattr(sys, 'argv', ['train_clean_encoder.py', '--pretraining_dataset', 'synthetic_shapes',
                                      '--data_dir', str(out), '--width', '4', '--epochs', '1', '--batch_size', '32',
                                      '--num_workers', '0', '--device', 'cpu', '--no_progress',
                                      '--results_dir', str(tmp_path / 'run')])
    stage0.main()
    model, checkpoint = load_encoder(tmp_path / 'run' / 'model_1.pth')
    assert model.width == 4 and checkpoint['epoch'] == 1 and checkpoint['args']['data_dir'] == str(out)
    assert np.isfinite(checkpoint['log'][0]['train_loss'])


@pytest.mark.parametrize('change, error, message', [
    ({'--poison_rate': '0.5'}, DataError, 'class 3 has 26 images in the split, fewer than the 128 to poison'),
    ({'--poison_rate': '0'}, UsageError, r'--poison_rate must lie in \(0, 1\), got 0.0'),
    ({'--poison_rate': '1'}, UsageError, r'--poison_rate must lie in \(0, 1\)'),
    ({'--poison_rate': '0.001'}, DataError, 'poisons no image'),
    ({'--target_class': '10'}, UsageError, '--target_class 10: synthetic_shapes has classes 0..9'),
    ({'--dataset': 'cifar100'}, DataError, "unknown dataset 'cifar100'"),
    ({'--dataset': 'stl10'}, DataError, "stl10: its pre-training split 'train_unlabeled' has no labels, so the "
                                        'target class cannot be chosen'),
])
def test_poison_refusals_write_nothing(tmp_path, data_root, ctrl_trigger, change, error, message):
    args = poison_args(data_root, ctrl_trigger, tmp_path / 'out')
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    with pytest.raises(error, match=message):
        poison.main(args)
    assert not (tmp_path / 'out').exists()


def test_poison_refuses_another_image_size_and_the_source_folder(tmp_path, data_root):
    small = tmp_path / 'small.npz'
    make_trigger.main(['--image_size', '16', '--row', '0', '--col', '0', '--size', '4', '--out', str(small)])
    with pytest.raises(DataError, match='trigger is 16x16 but the images are 32x32'):
        poison.main(poison_args(data_root, small, tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()
    before = (data_root / 'synthetic_shapes' / 'train.npz').read_bytes()
    with pytest.raises(UsageError, match='is the source dataset folder'):
        poison.main(poison_args(data_root, small, data_root / 'synthetic_shapes', '--overwrite'))
    assert (data_root / 'synthetic_shapes' / 'train.npz').read_bytes() == before


@pytest.mark.process
def test_poison_keeps_a_non_empty_folder_unless_overwrite(tmp_path, data_root, ctrl_trigger):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train.npz').write_bytes(b'mine')
    result = run_script('-m', 'datasets.poison', *poison_args(data_root, ctrl_trigger, out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: --out {out}: exists and is not empty; pass --overwrite to write into it']
    assert (out / 'train.npz').read_bytes() == b'mine' and sorted(p.name for p in out.iterdir()) == ['train.npz']
    poison.main(poison_args(data_root, ctrl_trigger, out, '--overwrite'))
    assert load_split('synthetic_shapes', 'train', out)[0].shape == (256, 32, 32, 3)
