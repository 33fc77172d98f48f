"""Prepare datasets as `<out>/<name>/<split>.npz` (docs/DESIGN.md §2.1): real sets from their raw files (or, for
sklearn_digits, from an installed package), synthetic sets from a seed.

    python -m datasets.prepare synthetic_shapes synthetic_digits                  # offline, seconds
    python -m datasets.prepare sklearn_digits                                     # offline, needs scikit-learn
    python -m datasets.prepare cifar10 stl10 gtsrb svhn --root ~/raw --download   # real sets
    python -m datasets.prepare cifar10_224                                        # from <out>/cifar10/*.npz

Raw files (--root, default data/raw) are read in torchvision's own layout, so a folder torchvision
downloaded into before works as it is:

    cifar10  <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    stl10    <root>/stl10_binary/{train_X, train_y, test_X, test_y, unlabeled_X}.bin
    gtsrb    <root>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm, <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm,
             <root>/gtsrb/GT-final_test.csv
    svhn     <root>/train_32x32.mat, <root>/test_32x32.mat   (reading .mat files needs scipy)

Reading goes through torchvision.datasets.CIFAR10 / STL10 / GTSRB / SVHN. torchvision accepts the
CIFAR10, STL10 and SVHN files only when their MD5 matches the official release; files that differ (a
subset, a re-packed copy) are refused with a one-line error, or, with --skip_checksums, read by this
module's own readers of the same formats (CIFAR10's pickles through an unpickler that builds nothing
but lists, strings and numpy arrays: an unverified pickle could otherwise run code). GTSRB has no
checksum in torchvision; its class is the number of the class folder.

Images: uint8 (N, 32, 32, 3) RGB. STL10 (96x96) and GTSRB (15..250 px, not square) are resized to
32x32 with PIL's bilinear filter (`Image.BILINEAR`, which Pillow widens when shrinking, so it averages
like an antialiased resize; the default of torchvision's transforms.Resize). CIFAR10 and SVHN are
32x32 already and are copied unchanged.
Labels: int64 (N,) in the registry's class order: CIFAR10 and STL10 0..9, GTSRB 0..42, SVHN the digit
(the .mat files store digit zero as 10; torchvision and the own reader both map it to 0).
STL10's `train_unlabeled.npz` holds `x` only (no `y`), which is what `datasets.load_split` reads;
torchvision reads that split's 2.7 GB file whole, so STL10 needs about 4 GB of memory.

`sklearn_digits`, real handwritten digits that need no download, is read from the package scikit-learn
(`pip install -r requirements-digits.txt`; --root and --download do not apply to it, --sizes is refused as for
every real set): `sklearn.datasets.load_digits()`, the 1797 8x8 images its wheel ships (a copy of the test set of
UCI's Optical Recognition of Handwritten Digits), grey levels v in 0..16 with 0 the background, target the digit
0..9. Each image becomes uint8 RGB as

    grey = round(v * 255 / 16)   (halves rounded up: v = 8 -> 128; 0 -> 0, 16 -> 255: white ink on black)
    x    = grey 8x8 resized to 32x32 with PIL's bilinear filter (RESIZE_FILTER, as STL10 and GTSRB),
           copied into the 3 channels R = G = B

and the splits are taken in load_digits()'s order: train = its first 1000 images, test = the remaining 797.
Its labels run 0, 1, ..., 9, 0, 1, ... (not sorted by class), so both splits are written as read (see Order).

Order: torchvision reads GTSRB's training images class folder by class folder, so they come sorted by class,
and the probe of stage 3 iterates its training features in a fixed order (as the original): trained on a
sorted file it sees one class after another, and its predictions pile up on the later classes at a cost in
accuracy (tests/datasets/test_probe_order.py). A labelled split whose labels come sorted by class is therefore written
in one fixed random order (numpy's default_rng(--seed).permutation), recorded in the npz as `order` (int64:
`order[i]` is the index, in the order read, of the i-th image written; `datasets.load_split` reads only `x`
and `y`), with one printed line. --keep_order writes such splits as read. Splits whose labels are not sorted
are written as read.

`cifar10_224`, the released code's shadow set for the 224-pixel encoders (its `data/cifar10/train_224.npz`), is
made from the prepared CIFAR10 (`<out>/cifar10/{train,test}.npz`, prepared first): every image resized to 224x224
with PIL's bicubic filter (`datasets.folders.resize_images`, the one resize of images to an encoder's size; the
released files' filter is not recorded), labels and order unchanged.

Existing npz files are never overwritten without --force. Every split of a dataset is written to a
temporary folder beside its destination, checked with `datasets.load_split`, then renamed into place.
"""
from __future__ import annotations

import argparse
import codecs
import functools
import hashlib
import importlib.util
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folders import resize_images
from .npz import load_split
from .registry import DATASETS, UNLABELED_SPLITS, DataError, get_info
from .synthetic import synthetic_splits

RAW_ROOT = Path('data') / 'raw'
ORDER_KEY = 'order'  # npz key of the permutation a class-sorted split was written in
RESIZE_FILTER = Image.BILINEAR
STL10_SIZE = 96
GTSRB_URL = 'https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/'

EXTRA_PACKAGES = {'svhn': 'scipy'}  # GTSRB needs only Pillow, which torchvision brings
# The package a `packaged` set (datasets/registry.py) is read from, by its pip name: (import name, the requirements
# file of this optional extra)
PACKAGES = {'scikit-learn': ('sklearn', 'requirements-digits.txt')}
DIGITS_MAX = 16  # load_digits' grey levels run 0..16


@functools.cache
def torchvision_datasets():
    """torchvision.datasets, imported on first use: importing it costs 2-3 s (it pulls in torch._dynamo through
    torchvision.ops), which the synthetic sets, the common case, do not need."""
    import torchvision.datasets
    return torchvision.datasets


def raw_files(name: str) -> list[tuple[str, str | None]]:
    """The raw files torchvision reads for a real set, relative to --root, with the MD5 it insists on (None: not
    checked)."""
    if name == 'gtsrb':  # read from its own folders and CSV file: nothing of torchvision's is needed
        return [('gtsrb/GTSRB/Training', None), ('gtsrb/GTSRB/Final_Test/Images', None),
                ('gtsrb/GT-final_test.csv', None)]
    tv = torchvision_datasets()
    if name == 'cifar10':
        cifar10 = tv.CIFAR10
        return ([(f'{cifar10.base_folder}/{file}', md5) for file, md5 in cifar10.train_list + cifar10.test_list]
                + [(f"{cifar10.base_folder}/{cifar10.meta['filename']}", cifar10.meta['md5'])])
    if name == 'stl10':
        return [(f'{tv.STL10.base_folder}/{file}', md5) for file, md5 in tv.STL10.train_list + tv.STL10.test_list]
    if name == 'svhn':
        return [(tv.SVHN.split_list[split][1], tv.SVHN.split_list[split][2]) for split in ('train', 'test')]
    raise KeyError(name)


def how_to_get(name: str) -> str:
    """Where a real set's raw files come from, for the message when they are missing."""
    if name in ('cifar10', 'stl10'):
        tv = torchvision_datasets()
        url = (tv.CIFAR10 if name == 'cifar10' else tv.STL10).url
        return f'unpack {url} into the --root folder'
    return {'gtsrb': 'unzip GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip '
                     f'from {GTSRB_URL} into <root>/gtsrb/',
            'svhn': 'put train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ '
                    'into the --root folder'}[name]


def torchvision_reader(name: str, split: str) -> Callable:
    """The torchvision dataset class of a real set's split, called as reader(root, download=...)."""
    tv = torchvision_datasets()
    return {'cifar10': {'train': functools.partial(tv.CIFAR10, train=True),
                        'test': functools.partial(tv.CIFAR10, train=False)},
            'stl10': {'train': functools.partial(tv.STL10, split='train'),
                      'test': functools.partial(tv.STL10, split='test'),
                      'train_unlabeled': functools.partial(tv.STL10, split='unlabeled')},
            'gtsrb': {'train': functools.partial(tv.GTSRB, split='train'),
                      'test': functools.partial(tv.GTSRB, split='test')},
            'svhn': {'train': functools.partial(tv.SVHN, split='train'),
                     'test': functools.partial(tv.SVHN, split='test')}}[name][split]


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def write_dataset(name: str, out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
                  extra: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Write every split into a temporary folder inside `out_dir`, validate them with load_split, then
    rename them into place (same file system, so each rename is atomic). `extra[split]`: more arrays for
    that split's npz (e.g. its `order`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.prepare-', dir=out_dir))
    try:
        for split, (x, y) in splits.items():
            arrays = {'x': x} if y is None else {'x': x, 'y': y}
            arrays.update((extra or {}).get(split, {}))
            with open(staging / f'{split}.npz', 'wb') as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            load_split(name, split, staging)
        for split in splits:
            os.replace(staging / f'{split}.npz', out_dir / f'{split}.npz')
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(name: str, split: str, path: Path, x: np.ndarray, y: np.ndarray | None) -> str:
    text = f'wrote {path}: {len(x)} images {x.shape[1]}x{x.shape[2]}'
    if y is not None and len(y):
        text += f', labels {y.min()}..{y.max()} ({len(np.unique(y))} classes present)'
    expected = get_info(name).splits[split]
    if not get_info(name).synthetic and len(x) != expected:
        text += f' (note: the full {name} {split} split has {expected})'
    return text


# ---------------------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------------------

def class_sorted(y: np.ndarray | None) -> bool:
    """Labels in non-decreasing order over more than one class: a split read class by class."""
    return y is not None and len(y) > 1 and y[0] != y[-1] and bool(np.all(y[1:] >= y[:-1]))


def fixed_order(x: np.ndarray, y: np.ndarray | None, seed: int,
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x, y, None) as given, or, when the labels are sorted by class, (x[order], y[order], order) with
    order = default_rng(seed).permutation(N): one fixed random order, the same for the same seed and N."""
    if not class_sorted(y):
        return x, y, None
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order], order


def reorder_splits(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray | None]], seed: int,
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], dict[str, dict[str, np.ndarray]]]:
    """Every class-sorted split of `splits` in its fixed random order; returns (splits, {split: {'order': ...}})
    and prints one line per split reordered."""
    ordered, extra = {}, {}
    for split, (x, y) in splits.items():
        x, y, order = fixed_order(x, y, seed)
        ordered[split] = (x, y)
        if order is not None:
            extra[split] = {ORDER_KEY: order.astype(np.int64)}
            print(f"{name}/{split}: its labels come sorted by class, which would bias the probe's fixed-order "
                  f"training; written in a fixed random order (seed {seed}), recorded as '{ORDER_KEY}' in the npz "
                  '(--keep_order: as read)')
    return ordered, extra


# ---------------------------------------------------------------------------------------------------
# Converting image sequences to arrays
# ---------------------------------------------------------------------------------------------------

def convert(images: Sequence, image_size: int, desc: str, progress: bool = True,
            ) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, S, S, 3), y int64 (N,)) from a dataset whose items are (PIL image, label)."""
    x = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    y = np.empty(len(images), dtype=np.int64)
    for index in tqdm(range(len(images)), desc=desc, unit='img', disable=not progress):
        image, label = images[index]
        image = image.convert('RGB')
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), RESIZE_FILTER)
        x[index] = np.asarray(image)
        y[index] = -1 if label is None else label
    return x, y


class ArrayImages:
    """uint8 (N, H, W, 3) images and their labels, indexed like a torchvision dataset."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        if labels is not None and len(labels) != len(images):
            raise DataError(f'{len(images)} images but {len(labels)} labels')
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int | None]:
        label = None if self.labels is None else int(self.labels[index])
        return Image.fromarray(np.ascontiguousarray(self.images[index])), label


# ---------------------------------------------------------------------------------------------------
# The project's own readers, for raw files whose checksum differs from the official release
# ---------------------------------------------------------------------------------------------------

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

PICKLE_ALLOWED = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                  ('numpy.core.multiarray', '_reconstruct'): _reconstruct,
                  ('numpy._core.multiarray', '_reconstruct'): _reconstruct,
                  ('_codecs', 'encode'): codecs.encode}


class ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numpy arrays (a CIFAR batch) and refuses every other class."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name} (only numpy arrays allowed)')
        return PICKLE_ALLOWED[module, name]


def read_cifar10(root: Path, train: bool) -> ArrayImages:
    cifar10 = torchvision_datasets().CIFAR10  # its file list; the files are read below, not by torchvision
    files = [file for file, _ in (cifar10.train_list if train else cifar10.test_list)]
    images, labels = [], []
    for file in files:
        path = root / cifar10.base_folder / file
        with open(path, 'rb') as handle:
            try:
                batch = ArrayUnpickler(handle, encoding='latin1').load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
                raise DataError(f'{path}: not a CIFAR10 batch ({error})') from None
        if not isinstance(batch, dict) or 'data' not in batch or 'labels' not in batch:
            raise DataError(f"{path}: not a CIFAR10 batch (expected a dict with 'data' and 'labels')")
        data = np.asarray(batch['data'], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch['labels']):
            raise DataError(f"{path}: 'data' must be (N, 3072) with one label per row, found {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are R, G, B planes
        labels.extend(batch['labels'])
    return ArrayImages(np.concatenate(images), np.asarray(labels, dtype=np.int64))


def read_stl10(root: Path, split: str) -> ArrayImages:
    prefix = {'train': 'train', 'test': 'test', 'train_unlabeled': 'unlabeled'}[split]
    folder = root / torchvision_datasets().STL10.base_folder
    path = folder / f'{prefix}_X.bin'
    pixels = np.memmap(path, dtype=np.uint8, mode='r')  # the unlabelled file is 2.7 GB: read lazily
    if pixels.size % (3 * STL10_SIZE * STL10_SIZE):
        raise DataError(f'{path}: size {pixels.size} is not a whole number of 3x96x96 images')
    # each image is stored channel by channel, column-major: (N, C, W, H) -> (N, H, W, C)
    images = pixels.reshape(-1, 3, STL10_SIZE, STL10_SIZE).transpose(0, 3, 2, 1)
    if split == 'train_unlabeled':
        return ArrayImages(images, None)
    labels = np.fromfile(folder / f'{prefix}_y.bin', dtype=np.uint8).astype(np.int64) - 1
    return ArrayImages(images, labels)  # the file counts classes from 1


def read_svhn(root: Path, split: str) -> ArrayImages:
    import scipy.io
    path = root / torchvision_datasets().SVHN.split_list[split][1]
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError) as error:
        raise DataError(f'{path}: not a readable .mat file ({error})') from None
    if 'X' not in mat or 'y' not in mat:
        raise DataError(f"{path}: missing 'X' or 'y' (found {sorted(k for k in mat if not k.startswith('__'))})")
    images = np.asarray(mat['X'], dtype=np.uint8).transpose(3, 0, 1, 2)  # (H, W, C, N) -> (N, H, W, C)
    labels = np.asarray(mat['y'], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores digit zero as 10
    return ArrayImages(images, labels)


OWN_READERS: dict[str, dict[str, Callable[[Path], ArrayImages]]] = {
    'cifar10': {'train': functools.partial(read_cifar10, train=True),
                'test': functools.partial(read_cifar10, train=False)},
    'stl10': {split: functools.partial(read_stl10, split=split) for split in ('train', 'test', 'train_unlabeled')},
    'svhn': {split: functools.partial(read_svhn, split=split) for split in ('train', 'test')},
}


# ---------------------------------------------------------------------------------------------------
# Real sets
# ---------------------------------------------------------------------------------------------------

def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def check_package(name: str) -> None:
    """The optional package a real set needs is installed: a `packaged` set's source (registry), or the reader of
    its raw files (EXTRA_PACKAGES)."""
    packaged = get_info(name).packaged
    if packaged:
        module, requirements = PACKAGES[packaged]
        if importlib.util.find_spec(module) is None:
            raise DataError(f'{name}: needs the package {packaged} (pip install -r {requirements})')
        return
    package = EXTRA_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise DataError(f'{name}: reading its raw files needs the package {package} (pip install {package})')


def check_raw_files(name: str, root: Path, skip_checksums: bool) -> bool:
    """Check the raw files of a real set are there; True when every checksum matches torchvision's.

    Raises a DataError saying what was looked for and how to get it, or which file fails its MD5.
    """
    missing = [root / file for file, _ in raw_files(name) if not (root / file).exists()]
    if missing:
        more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise DataError(f'{name}: looked for {missing[0]}{more}, not found; rerun with --download '
                        f'(online), or {how_to_get(name)} (--root {root})')
    mismatched = [root / file for file, md5 in raw_files(name) if md5 and md5_of(root / file) != md5]
    if mismatched and not skip_checksums:
        more = f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''
        raise DataError(f"{mismatched[0]}{more}: MD5 differs from the official {name} release, so torchvision "
                        'refuses it; re-download with --download, or pass --skip_checksums to read it anyway')
    return not mismatched


def check_gtsrb_classes(root: Path) -> None:
    """torchvision numbers GTSRB's training classes by folder order; that is the class only when all
    43 folders 00000..00042 are there."""
    training = root / raw_files('gtsrb')[0][0]
    folders = sorted(entry.name for entry in training.iterdir() if entry.is_dir())
    expected = [f'{label:05d}' for label in range(get_info('gtsrb').num_classes)]
    if folders != expected:
        found = ', '.join(folders[:5]) + (' ...' if len(folders) > 5 else '')
        raise DataError(f'{training}: expected the {len(expected)} class folders 00000..00042, found '
                        f'{len(folders)} ({found}); torchvision numbers the classes by folder order')


def read_real(name: str, root: Path, download: bool, verified: bool, progress: bool,
              ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every split of a real set, converted to (x, y); y is None for unlabelled splits.

    `verified`: the raw files match torchvision's checksums (or --download fetches them), so torchvision
    reads them; otherwise the own readers do.
    """
    image_size = get_info(name).image_size
    splits = {}
    for split in get_info(name).splits:
        try:
            if verified:
                images = torchvision_reader(name, split)(str(root), download=download)
            else:
                images = OWN_READERS[name][split](root)
            if name == 'gtsrb' and split == 'train':
                check_gtsrb_classes(root)
            x, y = convert(images, image_size, f'{name}/{split}', progress)
        except DataError:
            raise
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
            reason = ' '.join(str(error).split())
            what = 'downloading into' if download else 'reading the raw files under'
            raise DataError(f'{name} {split}: {what} {root} failed ({reason}); {how_to_get(name)}') from None
        splits[split] = (x, None if split in UNLABELED_SPLITS else y)
    return splits


def digits_to_images(images: np.ndarray, labels: np.ndarray, image_size: int = 32, desc: str = 'sklearn_digits',
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, S, S, 3), y int64 (N,)) of load_digits' images, float (N, 8, 8) grey levels v in 0..16: grey
    round(v * 255 / 16) (halves up), resized to S x S with RESIZE_FILTER, in all 3 channels."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise DataError(f'{desc}: expected grey images of shape (N, H, W), found {images.shape}')
    if images.size and not (0 <= images.min() and images.max() <= DIGITS_MAX):
        raise DataError(f'{desc}: expected grey levels 0..{DIGITS_MAX}, found {images.min():g}..{images.max():g}')
    grey = np.floor(images * 255 / DIGITS_MAX + 0.5).astype(np.uint8)
    return convert(ArrayImages(np.repeat(grey[..., None], 3, axis=-1), labels), image_size, desc, progress)


def read_sklearn_digits(progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn_digits' splits: load_digits() converted by digits_to_images, train its first 1000 images, test the
    rest, in the package's order."""
    info = get_info('sklearn_digits')
    try:
        from sklearn.datasets import load_digits
        digits = load_digits()
    except (ImportError, OSError, ValueError) as error:
        reason = ' '.join(str(error).split())
        raise DataError(f'sklearn_digits: scikit-learn failed to load its digits ({reason}); '
                        f'reinstall it (pip install -r {PACKAGES[info.packaged][1]})') from None
    total = sum(info.splits.values())
    if len(digits.images) != total:
        raise DataError(f'sklearn_digits: load_digits() gave {len(digits.images)} images, expected {total}')
    x, y = digits_to_images(digits.images, digits.target, info.image_size, 'sklearn_digits', progress)
    train = info.splits['train']
    return {'train': (x[:train], y[:train]), 'test': (x[train:], y[train:])}


PACKAGED_READERS: dict[str, Callable[[bool], dict[str, tuple[np.ndarray, np.ndarray]]]] = {
    'sklearn_digits': read_sklearn_digits,
}


def resize_prepared(name: str, out: Path, progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every split of a `resized_from` set: its source's prepared split under `out`, resized to the set's size."""
    info = get_info(name)
    splits = {}
    for split in info.splits:
        x, y = load_split(info.resized_from, split, out / info.resized_from)
        resized = np.empty((len(x), info.image_size, info.image_size, 3), dtype=np.uint8)  # 7.5 GB for CIFAR10
        for start in tqdm(range(0, len(x), 1000), desc=f'{name}/{split}', disable=not progress):
            resized[start:start + 1000] = resize_images(x[start:start + 1000], info.image_size)
        splits[split] = (resized, y)
    return splits


# ---------------------------------------------------------------------------------------------------
# Synthetic sets
# ---------------------------------------------------------------------------------------------------

def parse_sizes(text: str) -> dict[str, int]:
    """'train=N,test=M' -> {'train': N, 'test': M}."""
    sizes = {}
    for item in filter(None, text.split(',')):
        split, _, number = item.partition('=')
        if not number.strip().isdigit() or int(number) < 1:
            raise DataError(f"--sizes: expected split=N with N >= 1 (e.g. train=1000,test=200), got '{item}'")
        sizes[split.strip()] = int(number)
    return sizes


def make_synthetic_splits(name: str, sizes: dict[str, int], seed: int, progress: bool,
                          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    info = get_info(name)
    unknown = sorted(set(sizes) - set(info.splits))
    if unknown:
        raise DataError(f"--sizes: dataset '{name}' has no split '{unknown[0]}' (it has {list(info.splits)})")
    all_sizes = {**info.splits, **sizes}
    with tqdm(total=1, desc=f'{name} ({sum(all_sizes.values())} images)', disable=not progress) as bar:
        splits = synthetic_splits(name, all_sizes, seed=seed)
        bar.update()
    return {split: splits[split] for split in info.splits}


# ---------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('names', nargs='+', choices=sorted(DATASETS), metavar='NAME',
                        help=f"datasets to prepare: {', '.join(DATASETS)}")
    parser.add_argument('--root', default=str(RAW_ROOT), metavar='DIR',
                        help='folder holding the raw files of the real sets, in torchvision\'s layout '
                             f'(default: {RAW_ROOT}; sklearn_digits, read from a package, has none)')
    parser.add_argument('--out', '--data_root', dest='out', default='data', metavar='DATA_ROOT',
                        help='where to write <name>/<split>.npz (default: data)')
    parser.add_argument('--download', action='store_true',
                        help='download missing raw files of the real sets into --root (needs a network; '
                             'sklearn_digits needs no download)')
    parser.add_argument('--skip_checksums', action='store_true',
                        help='read raw files whose MD5 differs from the official release with this '
                             "module's own readers (torchvision refuses them)")
    parser.add_argument('--sizes', default='', metavar='train=N,test=M',
                        help="number of images per split of the synthetic sets (default: the registry's)")
    parser.add_argument('--seed', default=0, type=int,
                        help='seed of the synthetic sets and of the order class-sorted splits are written in '
                             '(default: 0)')
    parser.add_argument('--keep_order', action='store_true',
                        help='write splits whose labels come sorted by class (GTSRB train) in the order read, '
                             'not in a fixed random order')
    parser.add_argument('--force', action='store_true', help='overwrite existing npz files')
    parser.add_argument('--no_progress', action='store_true', help='hide the progress bars')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    names = list(dict.fromkeys(args.names))
    root, out = Path(args.root).expanduser(), Path(args.out).expanduser()
    progress = not args.no_progress and os.environ.get('TQDM_DISABLE') != '1'
    sizes = parse_sizes(args.sizes)
    real = [name for name in names if not get_info(name).synthetic and not get_info(name).resized_from]
    if sizes and real:
        raise DataError(f'--sizes applies to the synthetic sets only, not to {real[0]}')

    # Fail before writing anything: existing outputs, missing packages or raw files.
    existing = [out / name / f'{split}.npz' for name in names for split in get_info(name).splits
                if (out / name / f'{split}.npz').exists()]
    if existing and not args.force:
        more = f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''
        raise DataError(f'{existing[0]}{more} already exists; pass --force to overwrite')
    raw = [name for name in real if not get_info(name).packaged]
    for name in real:
        check_package(name)
    verified = {name: args.download or check_raw_files(name, root, args.skip_checksums) for name in raw}

    for name in names:
        if get_info(name).synthetic:
            splits = make_synthetic_splits(name, sizes, args.seed, progress)
        elif get_info(name).resized_from:
            splits = resize_prepared(name, out, progress)
        elif get_info(name).packaged:
            splits = PACKAGED_READERS[name](progress)
        else:
            splits = read_real(name, root, args.download, verified[name], progress)
        extra = {}
        if not args.keep_order and not get_info(name).resized_from:  # a resized set keeps its source's order
            splits, extra = reorder_splits(name, splits, args.seed)
        write_dataset(name, out / name, splits, extra)
        for split, (x, y) in splits.items():
            print(describe(name, split, out / name / f'{split}.npz', x, y))


if __name__ == '__main__':
    from core.cli import run_main
    run_main(main)
