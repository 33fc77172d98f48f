"""datasets: registry facts, npz validation, transforms, triggers and references, torch Datasets, synthetic."""
from __future__ import annotations

import os
import shlex
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COMPAT, requires_compat, write_split
from datasets import (DATASETS, DataError, ImagePairs, LabeledImages, ShadowImages, apply_trigger,
                      finetune_transform, get_info, load_reference, load_split, load_trigger, normalize_batch,
                      pretraining_names, read_npz, simclr_transform, split_path, triggered_copy)
from datasets import test_transform as eval_transform  # not test_*: pytest would collect it
from datasets.synthetic import make_synthetic, synthetic_splits

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
STL10 = ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308))


def images(n=6, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def labels(n=6, classes=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)


# --- registry ------------------------------------------------------------------------------------

def test_registry_facts():
    assert {name: DATASETS[name].num_classes for name in ('cifar10', 'stl10', 'gtsrb', 'svhn')} == {
        'cifar10': 10, 'stl10': 10, 'gtsrb': 43, 'svhn': 10}
    assert get_info('cifar10').normalization == CIFAR10
    assert get_info('stl10').normalization == STL10
    assert get_info('gtsrb').normalization is None and get_info('svhn').normalization is None
    assert get_info('gtsrb').classes[12] == 'Priority road'
    assert get_info('svhn').classes[1] == 'one' and get_info('stl10').classes[9] == 'truck'
    assert get_info('cifar10').splits == {'train': 50000, 'test': 10000}
    assert get_info('stl10').splits == {'train': 5000, 'test': 8000, 'train_unlabeled': 100000}
    assert get_info('stl10').pretraining_split == 'train_unlabeled'
    assert {'cifar10', 'stl10'} <= set(pretraining_names())
    assert not {'gtsrb', 'svhn'} & set(pretraining_names())
    assert all(info.image_size == 32 for info in DATASETS.values() if info.resized_from is None)
    assert get_info('cifar10_224').image_size == 224 and get_info('cifar10_224').resized_from == 'cifar10'


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="'imagenet'"):
        get_info('imagenet')
    with pytest.raises(DataError, match="'imagenet'"):
        load_split('imagenet', 'train')


def test_split_path(tmp_path):
    assert split_path('cifar10', 'test') == split_path('cifar10', 'test', '')
    assert split_path('cifar10', 'test').parts[-2:] == ('cifar10', 'test.npz')
    assert split_path('cifar10', 'train', tmp_path) == tmp_path / 'train.npz'


# --- load_split ----------------------------------------------------------------------------------

def load_cifar(folder, split='train'):
    return load_split('cifar10', split, folder)


def test_load_split_valid(tmp_path):
    x, y = images(), labels()
    write_split(tmp_path, 'train', x, y.astype(np.uint8))
    loaded_x, loaded_y = load_cifar(tmp_path)
    assert np.array_equal(loaded_x, x) and loaded_x.dtype == np.uint8
    assert np.array_equal(loaded_y, y) and loaded_y.dtype == np.int64 and loaded_y.shape == (6,)


def test_load_split_accepts_column_labels(tmp_path):
    y = labels()
    write_split(tmp_path, 'test', images(), y[:, None])
    _, loaded_y = load_cifar(tmp_path, 'test')
    assert loaded_y.shape == (6,) and np.array_equal(loaded_y, y)


def test_load_split_missing_file_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as error:
        load_cifar(tmp_path)
    message = str(error.value)
    assert str(tmp_path / 'train.npz') in message and 'prepare' in message and 'cifar10' in message


@pytest.mark.parametrize('case, arrays, words', [
    ('missing x', {'y': labels()}, ["'x'"]),
    ('missing y', {'x': images()}, ["'y'"]),
    ('float images', {'x': images().astype(np.float32), 'y': labels()}, ['uint8', 'float32']),
    ('channels first', {'x': images().transpose(0, 3, 1, 2), 'y': labels()}, ['(N, H, W, 3)']),
    ('grey images', {'x': images()[..., 0], 'y': labels()}, ['(N, H, W, 3)']),
    ('other size', {'x': images(size=28), 'y': labels()}, ['28x28', '32x32']),
    ('label too large', {'x': images(), 'y': np.array([0, 1, 2, 3, 4, 10])}, ['[0, 9]']),
    ('negative label', {'x': images(), 'y': np.array([0, 1, 2, 3, 4, -1])}, ['[0, 9]']),
    ('length mismatch', {'x': images(), 'y': labels(5)}, ['6 images', '5 labels']),
    ('float labels', {'x': images(), 'y': labels().astype(np.float64)}, ['integer']),
    ('label matrix', {'x': images(), 'y': np.zeros((6, 2), np.int64)}, ['(N,) or (N, 1)']),
])
def test_load_split_rejects(tmp_path, case, arrays, words):
    path = tmp_path / 'train.npz'
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        load_cifar(tmp_path)
    message = str(error.value)
    assert str(path) in message and '\n' not in message
    for word in words:
        assert word in message, (case, message)


def test_load_split_unknown_split(tmp_path):
    with pytest.raises(DataError, match='train_unlabeled'):
        load_cifar(tmp_path, 'train_unlabeled')


@pytest.mark.parametrize('y', [None, np.full(6, -1)])
def test_unlabelled_split(tmp_path, y):
    x = images()
    write_split(tmp_path, 'train_unlabeled', x, y)
    loaded_x, loaded_y = load_split('stl10', 'train_unlabeled', tmp_path)
    assert loaded_y is None and np.array_equal(loaded_x, x)


def test_not_an_npz_file(tmp_path):
    (tmp_path / 'train.npz').write_bytes(b'not a zip archive at all')
    with pytest.raises(DataError, match='train.npz'):
        load_cifar(tmp_path)
    np.save(tmp_path / 'array.npy', images())
    os.replace(tmp_path / 'array.npy', tmp_path / 'train.npz')  # a bare .npy under the npz name
    with pytest.raises(DataError, match='train.npz'):
        load_cifar(tmp_path)


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}',)


def test_read_npz_refuses_pickled_object_arrays(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'train.npz'
    np.savez(path, x=np.array([RunsCode(marker)], dtype=object), y=labels(1))
    with pytest.raises(DataError) as error:
        read_npz(path, ('x',))
    assert str(path) in str(error.value)
    with pytest.raises(DataError):
        load_cifar(tmp_path)
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as archive:  # proof that the array would run code
        archive['x']
    assert marker.exists()


def test_read_npz_returns_every_array(tmp_path):
    path = tmp_path / 'a.npz'
    np.savez(path, x=images(2), extra=np.arange(3))
    arrays = read_npz(path, ('x',))
    assert set(arrays) == {'x', 'extra'} and np.array_equal(arrays['extra'], np.arange(3))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        read_npz(path, ('x', 'y'))
    with pytest.raises(DataError, match='no such file'):
        read_npz(tmp_path / 'b.npz', ('x',))


# --- transforms ----------------------------------------------------------------------------------

def test_transform_shapes():
    image = Image.fromarray(images(1)[0])
    torch.manual_seed(0)
    for transform in (simclr_transform(CIFAR10), finetune_transform(CIFAR10), eval_transform(CIFAR10)):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert not torch.equal(simclr_transform(CIFAR10)(image), simclr_transform(CIFAR10)(image))
    assert torch.equal(eval_transform(CIFAR10)(image), eval_transform(CIFAR10)(image))


@pytest.mark.parametrize('normalization', [CIFAR10, STL10])
def test_normalize_batch_equals_eval_transform(normalization):
    batch = images(8, seed=3)
    expected = torch.stack([eval_transform(normalization)(Image.fromarray(x)) for x in batch])
    for given in (batch, torch.from_numpy(batch)):
        out = normalize_batch(given, normalization, 'cpu')
        assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# --- triggers ------------------------------------------------------------------------------------

def save_trigger(path, t, tm, **extra):
    np.savez(path, t=t, tm=tm, **extra)
    return path


def white_square(k=1, size=32):
    t = np.zeros((k, size, size, 3), np.float64)
    tm = np.ones((k, size, size, 3), np.int64)
    t[:, 21:31, 21:31] = 255
    tm[:, 21:31, 21:31] = 0
    return t, tm


def test_load_trigger(trigger_file):
    trigger = load_trigger(trigger_file, image_size=32)
    assert len(trigger) == 1 and trigger.image_size == 32
    assert trigger.info == ('white_21_10', 'replace')
    assert trigger.patch.dtype == np.float64 and trigger.mask.dtype == np.float64


@requires_compat('trigger', 'trigger_pt_white_21_10_ap_replace.npz')
def test_paper_trigger_loads_and_is_the_white_square():
    trigger = load_trigger(COMPAT / 'trigger' / 'trigger_pt_white_21_10_ap_replace.npz', image_size=32)
    t, tm = white_square()
    assert np.array_equal(trigger.patch, t) and np.array_equal(trigger.mask, tm)
    assert trigger.info == ('white_21_10', 'replace')


@pytest.mark.parametrize('case, arrays, words', [
    ('missing t', {'tm': white_square()[1]}, ["'t'"]),
    ('missing tm', {'t': white_square()[0]}, ["'tm'"]),
    ('other image size', dict(zip(('t', 'tm'), white_square(size=64))), ['64x64', '32x32']),
    ('mask values', {'t': white_square()[0], 'tm': white_square()[1] * 2}, ['0 and 1']),
    ('patch range', {'t': white_square()[0] * 2, 'tm': white_square()[1]}, ['0..255']),
    ('patch nan', {'t': white_square()[0] * np.nan, 'tm': white_square()[1]}, ['0..255']),
    ('shape mismatch', {'t': white_square()[0], 'tm': white_square()[1][..., :1]}, ['(K, H, W, 3)']),
    ('no patch', {'t': np.zeros((0, 32, 32, 3)), 'tm': np.zeros((0, 32, 32, 3))}, ['K >= 1']),
    ('strings', {'t': np.full((1, 32, 32, 3), 'a'), 'tm': white_square()[1]}, ['numeric']),
])
def test_load_trigger_rejects(tmp_path, case, arrays, words):
    path = tmp_path / 'trigger.npz'
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        load_trigger(path, image_size=32)
    message = str(error.value)
    assert str(path) in message and '\n' not in message
    for word in words:
        assert word in message, (case, message)


def test_single_unbatched_trigger_is_accepted(tmp_path):
    t, tm = white_square()
    trigger = load_trigger(save_trigger(tmp_path / 't.npz', t[0], tm[0]))
    assert len(trigger) == 1 and trigger.patch.shape == (1, 32, 32, 3)


def test_apply_trigger_replaces_the_patch_and_keeps_the_rest(trigger_file):
    trigger = load_trigger(trigger_file)
    x = images(5, seed=4)
    out = apply_trigger(x, trigger)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert (out[:, 21:31, 21:31] == 255).all()
    keep = np.ones((32, 32), bool)
    keep[21:31, 21:31] = False
    assert np.array_equal(out[:, keep], x[:, keep])
    assert np.array_equal(apply_trigger(x[0], trigger), out[0])  # one image (H, W, 3)
    assert np.array_equal(triggered_copy(x, trigger), out)
    assert not np.array_equal(x, out)  # the input itself is left untouched
    assert np.array_equal(x, images(5, seed=4))


def test_apply_trigger_numpy_equals_torch(tmp_path):
    rng = np.random.default_rng(5)
    tm = rng.integers(0, 2, (2, 32, 32, 3))
    t = np.where(tm == 0, rng.integers(0, 256, tm.shape), 0).astype(np.float64)
    trigger = load_trigger(save_trigger(tmp_path / 't.npz', t, tm), image_size=32)
    x = images(4, seed=6)
    for index in (0, 1):
        numpy_out = apply_trigger(x, trigger, index)
        torch_out = apply_trigger(torch.from_numpy(x), trigger, index)
        assert torch_out.dtype == torch.uint8
        assert np.array_equal(torch_out.numpy(), numpy_out)
        assert np.array_equal(numpy_out, (x * tm[index] + t[index]).astype(np.uint8))
    assert not np.array_equal(apply_trigger(x, trigger, 0), apply_trigger(x, trigger, 1))


# --- references ----------------------------------------------------------------------------------

def test_load_reference(reference_file):
    reference = load_reference(reference_file, num_classes=10, image_size=32)
    assert len(reference) == 1 and reference.target_label == 1
    assert reference.x.shape == (1, 32, 32, 3) and reference.x.dtype == np.uint8
    assert reference.y.dtype == np.int64


@requires_compat('reference', 'cifar10')
@pytest.mark.parametrize('name, num_classes, label', [('priority', 43, 12), ('one', 10, 1), ('truck', 10, 9)])
def test_paper_references_load_unchanged(name, num_classes, label):
    reference = load_reference(COMPAT / 'reference' / 'cifar10' / f'{name}.npz', num_classes, image_size=32)
    assert reference.target_label == label and len(reference) >= 1


@pytest.mark.parametrize('case, arrays, kwargs, words', [
    ('label out of range', {'x': images(1), 'y': np.array([12])}, {'num_classes': 10}, ['12', '0..9']),
    ('negative label', {'x': images(1), 'y': np.array([-1])}, {'num_classes': 10}, ['-1']),
    ('other size', {'x': images(1, size=64), 'y': np.array([1])}, {'image_size': 32}, ['64x64', '32x32']),
    ('float images', {'x': images(1).astype(np.float64), 'y': np.array([1])}, {}, ['uint8']),
    ('missing y', {'x': images(1)}, {}, ["'y'"]),
    ('no labels', {'x': images(1), 'y': np.array([], np.int64)}, {}, ['at least one']),
    ('count mismatch', {'x': images(2), 'y': np.array([1])}, {}, ['2 reference images', '1 labels']),
])
def test_load_reference_rejects(tmp_path, case, arrays, kwargs, words):
    path = tmp_path / 'reference.npz'
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        load_reference(path, **kwargs)
    message = str(error.value)
    assert str(path) in message and '\n' not in message
    for word in words:
        assert word in message, (case, message)


def test_single_unbatched_reference_is_accepted(tmp_path):
    path = tmp_path / 'reference.npz'
    np.savez(path, x=images(1)[0], y=np.int64(3))
    reference = load_reference(path, num_classes=10, image_size=32)
    assert reference.x.shape == (1, 32, 32, 3) and reference.target_label == 3


# --- torch Datasets ------------------------------------------------------------------------------

def test_image_pairs_items():
    dataset = ImagePairs(images(3), simclr_transform(CIFAR10))
    first, second = dataset[0]
    assert len(dataset) == 3
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)  # two independent augmentations


def test_labeled_images_items():
    x, y = images(3), labels(3)
    dataset = LabeledImages(x, y, eval_transform(CIFAR10))
    image, label = dataset[2]
    assert len(dataset) == 3 and image.shape == (3, 32, 32) and label == int(y[2])
    torch.testing.assert_close(image, normalize_batch(x[2:3], CIFAR10)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        LabeledImages(x, y[:2], eval_transform(CIFAR10))


@pytest.mark.parametrize('patches', [1, 2])
def test_shadow_images_items(tmp_path, patches):
    t, tm = white_square(patches)
    trigger = load_trigger(save_trigger(tmp_path / 't.npz', t, tm))
    reference_path = tmp_path / 'r.npz'
    np.savez(reference_path, x=images(2, seed=9), y=np.array([1, 1]))
    reference = load_reference(reference_path, 10, 32)
    x = images(4, seed=8)
    dataset = ShadowImages(x, trigger, reference, eval_transform(CIFAR10), finetune_transform(CIFAR10))
    clean, triggered, augmented = dataset[1]
    assert len(dataset) == 4
    assert clean.shape == (3, 32, 32) and triggered.shape == augmented.shape == (2, 3, 32, 32)
    torch.testing.assert_close(clean, normalize_batch(x[1:2], CIFAR10)[0], rtol=0, atol=1e-6)
    expected = normalize_batch(apply_trigger(x[1:2], trigger, 0), CIFAR10)[0]
    torch.testing.assert_close(triggered[0], expected, rtol=0, atol=1e-6)
    assert [dataset.trigger_index(i) for i in range(2)] == ([0, 0] if patches == 1 else [0, 1])


# --- synthetic data ------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['synthetic_shapes', 'synthetic_digits'])
def test_synthetic_is_deterministic_balanced_uint8(name):
    x, y = make_synthetic(name, 200, seed=3)
    assert x.dtype == np.uint8 and x.shape == (200, 32, 32, 3)
    assert y.dtype == np.int64 and y.shape == (200,)
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 20))
    again_x, again_y = make_synthetic(name, 200, seed=3)
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    other_x, _ = make_synthetic(name, 200, seed=4)
    assert not np.array_equal(x, other_x)
    assert x.std() > 30  # images, not blank arrays
    for label in range(10):  # every class holds distinct images
        assert len({image.tobytes() for image in x[y == label]}) == 20


def test_synthetic_classes_differ_in_structure_not_colour():
    x, y = make_synthetic('synthetic_shapes', 1000, seed=0)
    class_means = np.stack([x[y == label].reshape(-1, 3).mean(0) for label in range(10)])  # (10, 3)
    assert np.ptp(class_means, axis=0).max() < 25  # mean colour says little about the class


def test_synthetic_10000_images_in_a_few_seconds():
    start = time.perf_counter()
    x, y = make_synthetic('synthetic_shapes', 10000, seed=0)
    elapsed = time.perf_counter() - start
    assert x.shape == (10000, 32, 32, 3) and np.array_equal(np.bincount(y), np.full(10, 1000))
    assert elapsed < 10, f'{elapsed:.1f} s'


def test_synthetic_splits_and_errors():
    splits = synthetic_splits('synthetic_digits', {'train': 30, 'test': 20}, seed=1)
    assert {split: len(data[0]) for split, data in splits.items()} == {'train': 30, 'test': 20}
    assert not np.array_equal(splits['train'][0][:20], splits['test'][0])
    with pytest.raises(DataError):
        make_synthetic('cifar10', 10)
    with pytest.raises(DataError):
        make_synthetic('synthetic_shapes', 0)


def test_synthetic_sets_load_like_real_ones(data_root):
    x, y = load_split('synthetic_shapes', 'train', data_root / 'synthetic_shapes')
    assert x.shape == (256, 32, 32, 3) and y.max() <= 9
    assert get_info('synthetic_shapes').normalization is not None
