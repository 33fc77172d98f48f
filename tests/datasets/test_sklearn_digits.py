"""sklearn_digits: the real handwritten digits scikit-learn ships, prepared by datasets/prepare.py."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from datasets import DATASETS, DataError, get_info, load_split, pretraining_names
from datasets import prepare
from reference import make_reference

HAS_SKLEARN = importlib.util.find_spec('sklearn') is not None
requires_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason='scikit-learn is not installed '
                                                              '(pip install -r requirements-digits.txt)')


def load(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def test_registry_entry():
    info = get_info('sklearn_digits')
    assert 'sklearn_digits' in DATASETS and info.splits == {'train': 1000, 'test': 797}
    assert info.classes == get_info('svhn').classes and info.num_classes == 10 and info.image_size == 32
    assert info.packaged == 'scikit-learn' and not info.synthetic and info.resized_from is None
    assert info.normalization is None and 'sklearn_digits' not in pretraining_names()  # downstream only
    assert all(other.packaged is None for name, other in DATASETS.items() if name != 'sklearn_digits')


def test_conversion_of_a_hand_made_image():
    images = np.zeros((3, 8, 8))
    images[0] = 16  # all ink
    images[2, :, 4:] = 8  # left half background, right half the middle grey level
    x, y = prepare.digits_to_images(images, np.array([3, 0, 9]))
    assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3) and y.dtype == np.int64 and y.tolist() == [3, 0, 9]
    assert (x[0] == 255).all() and (x[1] == 0).all()
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey in R = G = B
    # v -> round(v * 255 / 16), halves up (8 -> 127.5 -> 128), then PIL's bilinear upscaling of the grey image
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[:, 4:] = 128
    expected = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(x[2, ..., 0], expected)
    assert x[2, :, :12].max() == 0 and (x[2, :, 20:] == 128).all() and 0 < x[2, 0, 16, 0] < 128  # a soft edge
    levels, _ = prepare.digits_to_images(np.arange(17, dtype=float).repeat(64).reshape(17, 8, 8), np.zeros(17))
    assert levels[:, 0, 0, 0].tolist() == [int(np.floor(v * 255 / 16 + 0.5)) for v in range(17)]
    with pytest.raises(DataError, match='grey levels 0..16'):
        prepare.digits_to_images(np.full((1, 8, 8), 17.0), np.zeros(1))


@requires_sklearn
def test_prepare_as_a_user_reads_and_cuts_a_reference(tmp_path, capsys):
    from sklearn.datasets import load_digits
    out = tmp_path / 'data'
    prepare.main(['sklearn_digits', '--out', str(out), '--root', str(tmp_path / 'no_such_folder')])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in printed] == [f'wrote {out}/sklearn_digits/train.npz',
                                                       f'wrote {out}/sklearn_digits/test.npz']
    assert 'sorted by class' not in ' '.join(printed) and not (tmp_path / 'no_such_folder').exists()
    digits = load_digits()
    for split, part in (('train', slice(0, 1000)), ('test', slice(1000, None))):
        arrays = load(out / 'sklearn_digits' / f'{split}.npz')
        assert set(arrays) == {'x', 'y'}  # not class-sorted: written as read, no 'order'
        assert arrays['x'].dtype == np.uint8 and arrays['y'].dtype == np.int64
        x, y = load_split('sklearn_digits', split, out / 'sklearn_digits')
        assert x.shape == ({'train': 1000, 'test': 797}[split], 32, 32, 3) and len(y) == len(x)
        assert sorted(set(y.tolist())) == list(range(10))
        np.testing.assert_array_equal(y, digits.target[part])  # the package's order
    x, _ = load_split('sklearn_digits', 'train', out / 'sklearn_digits')
    np.testing.assert_array_equal(x[:5], prepare.digits_to_images(digits.images[:5], digits.target[:5])[0])
    assert x.max() == 255 and x.min() == 0

    reference = tmp_path / 'one.npz'
    make_reference.main(['--dataset', 'sklearn_digits', '--data_root', str(out), '--class_id', '1', '--first', '1',
                         '--out', str(reference)])
    arrays = load(reference)
    assert arrays['x'].shape == (1, 32, 32, 3) and arrays['y'].tolist() == [1]
    np.testing.assert_array_equal(arrays['x'][0], x[1])  # load_digits' image 1 is a one


def test_without_scikit_learn_one_line_and_nothing_written(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(prepare.importlib.util, 'find_spec',
                        lambda name, *args: None if name == 'sklearn' else real_find_spec(name, *args))
    with pytest.raises(DataError) as raised:
        prepare.main(['synthetic_digits', 'sklearn_digits', '--out', str(tmp_path / 'data')])
    assert str(raised.value) == ('sklearn_digits: needs the package scikit-learn '
                                 '(pip install -r requirements-digits.txt)')
    assert not (tmp_path / 'data').exists()  # checked before anything, the synthetic set included


def test_sizes_refused(tmp_path):
    with pytest.raises(DataError, match='synthetic sets only, not to sklearn_digits'):
        prepare.main(['sklearn_digits', '--out', str(tmp_path), '--sizes', 'train=5'])
    assert not list(tmp_path.iterdir())


def test_requirements_name_the_package():
    from conftest import REPO
    assert 'scikit-learn' in (REPO / 'requirements-digits.txt').read_text()
    assert 'requirements-digits.txt' in (REPO / 'requirements-dev.txt').read_text()
    assert 'scikit-learn' not in (REPO / 'requirements.txt').read_text()
