"""datasets/prepare.py on tiny raw files written in the exact on-disk formats torchvision reads.

Formats covered: CIFAR10's pickled batches (cifar-10-batches-py), STL10's stl10_binary/*.bin, GTSRB's
folder layout (Training/<class>/*.ppm, Final_Test/Images/*.ppm + GT-final_test.csv) and SVHN's .mat
files (skipped without scipy). CIFAR10, STL10 and SVHN fail torchvision's MD5 check here (they are not
the official files), so each is read twice: by the own reader (--skip_checksums) and, with the
checksum functions patched, by torchvision itself; both must give the images that were written.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import run_script
from datasets import DataError, get_info, load_split
from datasets import prepare
from datasets.synthetic import synthetic_splits


def resized(image: np.ndarray) -> np.ndarray:
    """What prepare must make of an image that is not 32x32: PIL's bilinear resize."""
    return np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))


def load(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def trust_raw_files(monkeypatch, name: str, root) -> None:
    """Make the fake raw files pass both MD5 checks (ours and torchvision's) so torchvision reads them."""
    official = {str(root / file): md5 for file, md5 in prepare.raw_files(name)}
    monkeypatch.setattr(prepare, 'md5_of', lambda path, *args: official[str(path)])
    module = {'cifar10': 'cifar', 'stl10': 'stl10', 'svhn': 'svhn'}[name]
    monkeypatch.setattr(f'torchvision.datasets.{module}.check_integrity', lambda *args, **kwargs: True)


# ------------------------------------------------------------------------------------------ synthetic

@pytest.mark.process
def test_synthetic_as_a_user_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / 'data'
    result = run_script('-m', 'datasets.prepare', 'synthetic_shapes', 'synthetic_digits', '--out', str(out),
                        '--sizes', 'train=40,test=20', '--seed', '3')
    assert result.returncode == 0, result.stderr
    for name in ('synthetic_shapes', 'synthetic_digits'):
        expected = synthetic_splits(name, {'train': 40, 'test': 20}, seed=3)
        for split, (x_expected, y_expected) in expected.items():
            arrays = load(out / name / f'{split}.npz')
            assert arrays['x'].dtype == np.uint8 and arrays['x'].shape == (len(x_expected), 32, 32, 3)
            assert arrays['y'].dtype == np.int64 and arrays['y'].shape == (len(x_expected),)
            np.testing.assert_array_equal(arrays['x'], x_expected)
            np.testing.assert_array_equal(arrays['y'], y_expected)
    assert not [p for p in out.rglob('*') if p.name.startswith('.')], 'temporary files left behind'

    before = (out / 'synthetic_digits' / 'train.npz').read_bytes()
    again = run_script('-m', 'datasets.prepare', 'synthetic_digits', '--out', str(out), '--sizes', 'train=30')
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and '--force' in again.stderr
    assert (out / 'synthetic_digits' / 'train.npz').read_bytes() == before

    prepare.main(['synthetic_digits', '--out', str(out), '--sizes', 'train=30', '--force'])
    x, y = load_split('synthetic_digits', 'train', out / 'synthetic_digits')
    assert len(x) == len(y) == 30


@pytest.mark.parametrize('sizes, message', [('train=0', 'N >= 1'), ('train=ten', 'split=N'),
                                            ('validation=5', "no split 'validation'")])
def test_bad_sizes(tmp_path, sizes, message):
    with pytest.raises(DataError, match=message):
        prepare.main(['synthetic_digits', '--out', str(tmp_path), '--sizes', sizes])
    assert not list(tmp_path.iterdir())


def test_sizes_refused_for_real_sets(tmp_path):
    with pytest.raises(DataError, match='synthetic sets only'):
        prepare.main(['cifar10', '--out', str(tmp_path), '--root', str(tmp_path), '--sizes', 'train=5'])


# ------------------------------------------------------------------------------------------ CIFAR10

def write_cifar10(root, per_batch: int = 2):
    """cifar-10-batches-py: pickled dicts with 'data' (N, 3072) R, G, B planes and 'labels'."""
    rng = np.random.default_rng(0)
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    written = {'train': ([], []), 'test': ([], [])}
    for file in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        batch = {'batch_label': file, 'labels': y.tolist(),
                 'data': x.transpose(0, 3, 1, 2).reshape(per_batch, -1),
                 'filenames': [f'{file}_{i}.png' for i in range(per_batch)]}
        with open(folder / file, 'wb') as handle:
            pickle.dump(batch, handle, protocol=2)
        images, labels = written['test' if file == 'test_batch' else 'train']
        images.append(x)
        labels.append(y)
    with open(folder / 'batches.meta', 'wb') as handle:
        pickle.dump({'label_names': list(get_info('cifar10').classes), 'num_cases_per_batch': per_batch,
                     'num_vis': 3072}, handle, protocol=2)
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in written.items()}


def check_written(out, name, expected):
    for split, (x_expected, y_expected) in expected.items():
        x, y = load_split(name, split, out / name)
        np.testing.assert_array_equal(x, x_expected)
        if y_expected is None:
            assert y is None and set(load(out / name / f'{split}.npz')) == {'x'}
        else:
            assert load(out / name / f'{split}.npz')['y'].dtype == np.int64
            np.testing.assert_array_equal(y, y_expected)


@pytest.mark.process
def test_cifar10_checksum_refusal_as_a_user(tmp_path):
    write_cifar10(tmp_path / 'raw')
    result = run_script('-m', 'datasets.prepare', 'cifar10', '--root', str(tmp_path / 'raw'),
                        '--out', str(tmp_path / 'data'))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert 'MD5' in result.stderr and '--skip_checksums' in result.stderr
    assert not (tmp_path / 'data').exists()


def test_cifar10_own_reader_and_torchvision_agree(tmp_path, monkeypatch):
    expected = write_cifar10(tmp_path / 'raw')
    prepare.main(['cifar10', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'own'),
                  '--skip_checksums'])
    check_written(tmp_path / 'own', 'cifar10', expected)

    trust_raw_files(monkeypatch, 'cifar10', tmp_path / 'raw')
    prepare.main(['cifar10', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'tv')])
    check_written(tmp_path / 'tv', 'cifar10', expected)


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    write_cifar10(tmp_path / 'raw')
    canary = tmp_path / 'canary'
    canary.write_text('still here')

    class Payload:
        def __reduce__(self):
            return os.remove, (str(canary),)

    with open(tmp_path / 'raw' / 'cifar-10-batches-py' / 'data_batch_3', 'wb') as handle:
        pickle.dump({'data': Payload(), 'labels': []}, handle, protocol=2)
    with pytest.raises(DataError, match='refusing to unpickle'):
        prepare.main(['cifar10', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'data'),
                      '--skip_checksums'])
    assert canary.exists()
    assert not list((tmp_path / 'data').rglob('*.npz'))


@pytest.mark.process
def test_missing_raw_files_one_line(tmp_path):
    result = run_script('-m', 'datasets.prepare', 'stl10', '--root', str(tmp_path / 'raw'),
                        '--out', str(tmp_path / 'data'))
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert 'stl10_binary' in line and '--download' in line and 'stl10_binary.tar.gz' in line


# ------------------------------------------------------------------------------------------ STL10

def write_stl10(root, sizes={'train': 3, 'test': 2, 'unlabeled': 4}):
    """stl10_binary/<prefix>_X.bin: each 96x96 image channel by channel, column-major; _y.bin: 1..10."""
    rng = np.random.default_rng(1)
    folder = root / 'stl10_binary'
    folder.mkdir(parents=True)
    expected = {}
    for prefix, n in sizes.items():
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        x.transpose(0, 3, 2, 1).tofile(folder / f'{prefix}_X.bin')  # (N, H, W, C) -> (N, C, W, H)
        y = None
        if prefix != 'unlabeled':
            y = rng.integers(1, 11, n).astype(np.uint8)
            y.tofile(folder / f'{prefix}_y.bin')
            y = y.astype(np.int64) - 1
        split = 'train_unlabeled' if prefix == 'unlabeled' else prefix
        expected[split] = (np.stack([resized(image) for image in x]), y)
    return expected


def test_stl10_resized_own_reader_and_torchvision(tmp_path, monkeypatch):
    expected = write_stl10(tmp_path / 'raw')
    prepare.main(['stl10', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'own'), '--skip_checksums'])
    check_written(tmp_path / 'own', 'stl10', expected)

    trust_raw_files(monkeypatch, 'stl10', tmp_path / 'raw')
    prepare.main(['stl10', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'tv')])
    check_written(tmp_path / 'tv', 'stl10', expected)


# ------------------------------------------------------------------------------------------ GTSRB

def write_gtsrb(root, classes: int = 43):
    """gtsrb/GTSRB/Training/<00000..00042>/*.ppm (+ GT csv per class); Final_Test/Images + GT csv."""
    rng = np.random.default_rng(2)
    base = root / 'gtsrb'
    train_x, train_y = [], []
    for label in range(classes):
        folder = base / 'GTSRB' / 'Training' / f'{label:05d}'
        folder.mkdir(parents=True)
        height, width = 20 + label % 7, 25 + label % 11  # GTSRB's images vary in size, not square
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / '00000_00000.ppm')
        (folder / f'GT-{label:05d}.csv').write_text('Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n')
        train_x.append(resized(image))
        train_y.append(label)
    images = base / 'GTSRB' / 'Final_Test' / 'Images'
    images.mkdir(parents=True)
    rows, test_x, test_y = ['Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId'], [], []
    for index, (label, (height, width)) in enumerate([(12, (32, 32)), (0, (41, 35)), (42, (17, 22))]):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(images / f'{index:05d}.ppm')
        rows.append(f'{index:05d}.ppm;{width};{height};5;5;{width - 5};{height - 5};{label}')
        test_x.append(image if (height, width) == (32, 32) else resized(image))  # 32x32: copied unchanged
        test_y.append(label)
    (base / 'GT-final_test.csv').write_text('\n'.join(rows) + '\n')
    return {'train': (np.stack(train_x), np.array(train_y)), 'test': (np.stack(test_x), np.array(test_y))}


def test_gtsrb_labels_from_folders_and_resized(tmp_path, capsys):
    expected = write_gtsrb(tmp_path / 'raw')
    prepare.main(['gtsrb', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'data')])
    # torchvision reads the training images class by class: they are written in a fixed random order, recorded
    train = load(tmp_path / 'data' / 'gtsrb' / 'train.npz')
    order = train['order']
    assert set(train) == {'x', 'y', 'order'} and order.dtype == np.int64
    assert sorted(order.tolist()) == list(range(43)) and order.tolist() != list(range(43))
    np.testing.assert_array_equal(order, np.random.default_rng(0).permutation(43))  # --seed 0, the default
    x_read, y_read = expected['train']
    check_written(tmp_path / 'data', 'gtsrb', {'train': (x_read[order], y_read[order]), 'test': expected['test']})
    x, y = load_split('gtsrb', 'train', tmp_path / 'data' / 'gtsrb')
    assert x.shape == (43, 32, 32, 3) and sorted(y.tolist()) == list(range(43)) and y.tolist() == order.tolist()
    assert 'order' not in load(tmp_path / 'data' / 'gtsrb' / 'test.npz')  # test labels 12, 0, 42: not sorted
    printed = [line for line in capsys.readouterr().out.splitlines() if 'sorted by class' in line]
    assert len(printed) == 1 and printed[0].startswith('gtsrb/train:') and 'seed 0' in printed[0]

    # the same order every time; another with another --seed; the order read with --keep_order
    prepare.main(['gtsrb', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'again'), '--no_progress'])
    assert load(tmp_path / 'again' / 'gtsrb' / 'train.npz')['order'].tolist() == order.tolist()
    prepare.main(['gtsrb', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'seed1'), '--seed', '1'])
    assert load(tmp_path / 'seed1' / 'gtsrb' / 'train.npz')['order'].tolist() != order.tolist()
    capsys.readouterr()
    prepare.main(['gtsrb', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'kept'), '--keep_order'])
    check_written(tmp_path / 'kept', 'gtsrb', expected)
    assert set(load(tmp_path / 'kept' / 'gtsrb' / 'train.npz')) == {'x', 'y'}
    assert 'sorted by class' not in capsys.readouterr().out


def test_fixed_order_only_for_class_sorted_labels():
    x = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1).repeat(3, axis=3)
    sorted_labels = np.repeat(np.arange(4), 3)
    shuffled_x, shuffled_y, order = prepare.fixed_order(x, sorted_labels, seed=7)
    np.testing.assert_array_equal(order, np.random.default_rng(7).permutation(12))
    np.testing.assert_array_equal(shuffled_x, x[order])
    np.testing.assert_array_equal(shuffled_y, sorted_labels[order])
    assert not prepare.class_sorted(shuffled_y)
    for labels in (sorted_labels[::-1].copy(), np.zeros(12, dtype=np.int64), np.array([2, 0, 1] * 4), None):
        same_x, same_y, none = prepare.fixed_order(x, labels, seed=7)  # descending, one class, mixed, unlabelled
        assert none is None and same_x is x and same_y is labels
    assert prepare.class_sorted(np.array([0, 0, 1, 5, 5])) and not prepare.class_sorted(np.array([3]))


def test_sorted_synthetic_split_is_reordered_and_loads(tmp_path, capsys):
    """Any labelled split that comes sorted is reordered, not only GTSRB's; load_split still reads it."""
    x, y = synthetic_splits('synthetic_digits', {'train': 30, 'test': 10}, seed=0)['train']
    by_class = np.argsort(y, kind='stable')
    splits, extra = prepare.reorder_splits('synthetic_digits', {'train': (x[by_class], y[by_class]),
                                                                'test': (x, y)}, seed=3)
    assert set(extra) == {'train'} and splits['test'][0] is x
    prepare.write_dataset('synthetic_digits', tmp_path / 'synthetic_digits', splits, extra)
    x_loaded, y_loaded = load_split('synthetic_digits', 'train', tmp_path / 'synthetic_digits')
    order = load(tmp_path / 'synthetic_digits' / 'train.npz')['order']
    np.testing.assert_array_equal(x_loaded, x[by_class][order])
    np.testing.assert_array_equal(y_loaded, y[by_class][order])
    assert "synthetic_digits/train: its labels come sorted by class" in capsys.readouterr().out


def test_gtsrb_with_missing_class_folders_is_refused(tmp_path):
    write_gtsrb(tmp_path / 'raw', classes=13)  # a partial copy: 00000..00012 only
    with pytest.raises(DataError, match='class folders 00000..00042'):
        prepare.main(['gtsrb', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'data')])
    assert not list(tmp_path.joinpath('data').rglob('*.npz'))


# ------------------------------------------------------------------------------------------ SVHN

def write_svhn(root):
    """<root>/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with digit zero stored as 10."""
    scipy_io = pytest.importorskip('scipy.io')
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    expected = {}
    for split, digits in {'train': [0, 1, 9, 0, 5], 'test': [1, 0, 7]}.items():
        x = rng.integers(0, 256, (len(digits), 32, 32, 3), dtype=np.uint8)
        stored = np.array([[10 if d == 0 else d] for d in digits], dtype=np.uint8)
        scipy_io.savemat(root / f'{split}_32x32.mat', {'X': x.transpose(1, 2, 3, 0), 'y': stored})
        expected[split] = (x, np.array(digits))
    return expected


def test_svhn_zero_label_own_reader_and_torchvision(tmp_path, monkeypatch):
    expected = write_svhn(tmp_path / 'raw')
    prepare.main(['svhn', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'own'), '--skip_checksums'])
    check_written(tmp_path / 'own', 'svhn', expected)

    trust_raw_files(monkeypatch, 'svhn', tmp_path / 'raw')
    prepare.main(['svhn', '--root', str(tmp_path / 'raw'), '--out', str(tmp_path / 'tv')])
    check_written(tmp_path / 'tv', 'svhn', expected)


def test_svhn_without_scipy_names_the_package(tmp_path, monkeypatch):
    real_find_spec = prepare.importlib.util.find_spec
    monkeypatch.setattr(prepare.importlib.util, 'find_spec',
                        lambda name, *args: None if name == 'scipy' else real_find_spec(name, *args))
    with pytest.raises(DataError, match='needs the package scipy'):
        prepare.main(['svhn', '--root', str(tmp_path), '--out', str(tmp_path / 'data')])
