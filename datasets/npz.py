"""Loading and validating `data/<name>/<split>.npz` files (docs/DESIGN.md §2.1, §11)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .folders import ImagesAtSize, empty_folder_note, is_image_folder, read_labelled, read_unlabelled
from .registry import UNLABELED_SPLITS, DataError, get_info, split_path


def prepare_hint(name: str) -> str:
    return f'prepare it with `python -m datasets.prepare {name}` (see data/README.md)'


def read_npz(path: str | Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an npz file (no pickles), with a DataError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'{path}: no such file')
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise DataError(f'{path}: not a readable .npz file ({_first_line(error)})') from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array saved under this name
        raise DataError(f"{path}: not an .npz archive of named arrays (expected {list(required)})")
    try:
        with archive:
            missing = [key for key in required if key not in archive.files]
            if missing:
                raise DataError(f'{path}: missing array(s) {missing} (found {archive.files})')
            arrays = {key: archive[key] for key in required}
            for key in set(archive.files) - set(required):  # optional ('info', ...): skipped if unreadable
                try:
                    arrays[key] = archive[key]
                except ValueError:  # a pickled object array: never unpickled
                    pass
            return arrays
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:  # e.g. a pickled object array
        raise DataError(f'{path}: not a readable .npz file ({_first_line(error)})') from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_images(x: np.ndarray, path: Path | str, image_size: int | None = None) -> np.ndarray:
    """`x` must be uint8 (N, H, W, 3) RGB, channels last, and H = W = image_size when given."""
    if x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must be uint8 images, found dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: 'x' must have shape (N, H, W, 3), found {x.shape}")
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        raise DataError(f"{path}: images are {x.shape[1]}x{x.shape[2]}, expected "
                        f'{image_size}x{image_size}')
    return x


def check_labels(y: np.ndarray, n: int, num_classes: int, path: Path | str) -> np.ndarray:
    """`y` of shape (N,) or (N, 1), integers in [0, num_classes); returned as int64 (N,)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must hold integer labels, found dtype {y.dtype}")
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] != 1):
        raise DataError(f"{path}: 'y' must have shape (N,) or (N, 1), found {y.shape}")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != n:
        raise DataError(f"{path}: {n} images in 'x' but {len(y)} labels in 'y'")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f'{path}: labels must lie in [0, {num_classes - 1}], found '
                        f'{y.min()}..{y.max()}')
    return y


def load_split(name: str, split: str, data_dir: str | Path | None = None, image_size: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(x uint8 (N, H, W, 3), y int64 (N,)) of a prepared split; y is None for unlabelled splits.

    `data_dir` holds `<split>.npz`, or is an image folder (datasets/folders.py: FOLDER/<split>/<class>/* for a
    labelled split). `image_size` None: the registry's size, which an npz must have; a size: images of any size,
    at that size (an encoder's input size, docs/DESIGN.md §2.6): an image folder's read at it, an npz's of another
    size as `datasets.folders.ImagesAtSize`, whose slices come resized.
    """
    info = get_info(name)
    if split not in info.splits:
        raise DataError(f"dataset '{name}' has no split '{split}' (it has {list(info.splits)})")
    unlabeled = split in UNLABELED_SPLITS
    if data_dir is not None and is_image_folder(data_dir):
        size = image_size or info.image_size
        if unlabeled:
            return read_unlabelled(data_dir, size, split), None
        x, y, classes = read_labelled(data_dir, size, split)
        return x, check_labels(y, len(x), info.num_classes, Path(data_dir) / split)
    path = split_path(name, split, data_dir)
    if not path.is_file():
        raise DataError(f'{path}: no such file{empty_folder_note(data_dir)}; {prepare_hint(name)}')
    arrays = read_npz(path, ('x',) if unlabeled else ('x', 'y'))
    x = check_images(arrays['x'], path, None if image_size else info.image_size)
    if image_size and x.shape[1:3] != (image_size, image_size):
        x = ImagesAtSize(x, image_size)  # resized slice by slice, when taken: a subset never resizes the whole split
    if unlabeled:
        return x, None
    return x, check_labels(arrays['y'], len(x), info.num_classes, path)


def load_images(name: str, split: str, data_dir: str | Path | None = None, image_size: int | None = None,
                ) -> np.ndarray:
    """The images of a split: an npz split's `x`, or every image of an image folder, flat or in class sub-folders,
    their labels unread (MIMIC's D, a defence's D, a shadow set); `image_size` as `load_split`."""
    info = get_info(name)
    if data_dir is not None and is_image_folder(data_dir):
        return read_unlabelled(data_dir, image_size or info.image_size, split)
    return load_split(name, split, data_dir, image_size)[0]
