"""Folders of images as a data source for any stage, and images at an encoder's input size (docs/DESIGN.md §2.6).

`--data_dir FOLDER` names a folder of `<split>.npz` files (§2.1, the default) or a folder of images of any size and
format PIL reads (PNG, JPEG, ...):

    FOLDER/*.png                                   unlabelled: MIMIC's clean subset D, a defence's D, a shadow set
    FOLDER/<class>/*.png                           labelled: the class is the sub-folder, classes in sorted order
    FOLDER/train/<class>/*, FOLDER/test/<class>/*  a downstream task: its two splits, the classes of train

A split is read from FOLDER/<split>/ when that folder exists, else from FOLDER itself (an unlabelled read takes the
images of every class sub-folder, their labels dropped). A folder is an image folder when it holds no `.npz` file
and holds images at most two folders down. Files are read in sorted name order (classes, then files), so the
order, and with it `--subset first`, is fixed.

Every image is converted to RGB and brought to the encoder's input size S as CLIP's and torchvision's evaluation
preprocessing do: its shorter side resized to S with PIL's bicubic filter, then the centre S x S cut (a square
image is only resized). The result is the uint8 (N, S, S, 3) array an npz split gives, so nothing after loading
changes. `resize_images` and `ImagesAtSize` bring npz images of another size (CIFAR's 32 px for a 224-px encoder)
to S the same way: the released code reads such sets from `*_224.npz` files it made beforehand (how they were
resized is not recorded); here they are resized on loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .registry import DataError

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.ppm', '.pgm', '.tif', '.tiff', '.webp'})
RESIZE_FILTER = Image.BICUBIC  # CLIP's preprocessing filter
LABELLED_LAYOUT = 'FOLDER/train/<class>/* and FOLDER/test/<class>/*'


def _visible(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith('.'))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _holds_images(folder: Path, depth: int) -> bool:
    """Images in `folder` or in its sub-folders down to `depth` levels."""
    entries = _visible(folder)
    return any(_is_image(path) for path in entries) or (
        depth > 0 and any(path.is_dir() and _holds_images(path, depth - 1) for path in entries))


def is_image_folder(folder: str | Path) -> bool:
    """A folder of images (flat, class sub-folders, or train/ and test/ of class sub-folders), not of npz splits."""
    folder = Path(folder)
    return folder.is_dir() and not any(folder.glob('*.npz')) and _holds_images(folder, depth=2)


def empty_folder_note(folder: str | Path | None) -> str:
    """', in an empty folder (...)' for an existing folder with nothing in it, else ''."""
    if folder is None or not Path(folder).is_dir() or _visible(Path(folder)):
        return ''
    return (' (the folder is empty: --data_dir holds <split>.npz files, or images: flat for an unlabelled set, in '
            'class sub-folders for a labelled one)')


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3): RGB, the shorter side resized to `size` (bicubic), the centre square cut."""
    image = image.convert('RGB')
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, RESIZE_FILTER)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def read_images(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) of image files; an unreadable one is a DataError naming it."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                images[index] = fit_image(image, size)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            reason = ' '.join(str(error).split()) or type(error).__name__
            raise DataError(f'{path}: not a readable image ({reason})') from None
    return images


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3) as `fit_image`; the array itself when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    resized = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        resized[index] = fit_image(Image.fromarray(image), size)
    return resized


class ImagesAtSize:
    """uint8 images (N, H, W, 3) seen at size S: a slice is resized (`resize_images`) when it is taken, so a large
    set is never held at 224 px whole. `transform(batch)` (a trigger) is applied after the resize. Read by
    `len()`, `.shape` and slicing, as `evaluation.features.encode_images` reads an array."""

    def __init__(self, images: np.ndarray, size: int, transform=None):
        self.images, self.size, self.transform = images, size, transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.images), self.size, self.size, 3)

    def __getitem__(self, index) -> np.ndarray:
        batch = resize_images(self.images[index], self.size)
        return batch if self.transform is None else self.transform(batch)


# --- reading a folder ------------------------------------------------------------------------------------------

def _layout(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, class sub-folders) of a folder that holds one or the other."""
    entries = _visible(folder)
    images = [path for path in entries if _is_image(path)]
    classes = [path for path in entries if path.is_dir()]
    if images and classes:
        raise DataError(f'{folder}: mixed layout: {len(images)} image(s) beside {len(classes)} sub-folder(s); put '
                        'every image in a class sub-folder (labelled) or none (unlabelled)')
    if not images and not classes:
        raise DataError(f'{folder}: no images (expected image files, or class sub-folders of them)')
    return images, classes


def _class_images(class_folder: Path) -> list[Path]:
    images, nested = _layout(class_folder)
    if nested:
        raise DataError(f'{class_folder}: a class folder holds sub-folders ({nested[0].name}); expected images only')
    return images


def split_folder(folder: Path, split: str, labelled: bool) -> Path:
    """FOLDER/<split>/ when it exists; else FOLDER itself for an unlabelled read."""
    if (folder / split).is_dir():
        return folder / split
    if labelled:
        raise DataError(f'{folder}: no {split}/ sub-folder; a labelled task is read from {LABELLED_LAYOUT}')
    return folder


def read_unlabelled(folder: str | Path, size: int, split: str = 'train') -> np.ndarray:
    """Every image of FOLDER/<split>/ (or FOLDER), flat or in class sub-folders, uint8 (N, size, size, 3)."""
    source = split_folder(Path(folder), split, labelled=False)
    images, classes = _layout(source)
    for class_folder in classes:
        images += _class_images(class_folder)
    return read_images(images, size)


def read_labelled(folder: str | Path, size: int, split: str, classes: tuple[str, ...] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(x uint8 (N, size, size, 3), y int64 (N,), class names) of FOLDER/<split>/<class>/*.

    `classes` (the train split's) fixes the labels: a class folder of another name is an error; a class may be
    absent from the split. Without it, the split's own sub-folders, in sorted order, are the classes.
    """
    source = split_folder(Path(folder), split, labelled=True)
    images, class_folders = _layout(source)
    if images:
        raise DataError(f'{source}: a flat folder of images has no labels; a labelled split is read from '
                        f'{LABELLED_LAYOUT}')
    names = tuple(path.name for path in class_folders)
    if classes is None:
        classes = names
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise DataError(f'{source}/{unknown[0]}: a class the train split does not have (its classes: '
                        f'{", ".join(classes[:8])}{" ..." if len(classes) > 8 else ""})')
    paths, labels = [], []
    for class_folder in class_folders:
        found = _class_images(class_folder)
        paths += found
        labels += [classes.index(class_folder.name)] * len(found)
    return read_images(paths, size), np.asarray(labels, dtype=np.int64), classes


@dataclass
class ImageTask:
    """A labelled downstream task read from an image folder."""
    train: tuple[np.ndarray, np.ndarray]  # uint8 (N, S, S, 3), int64 (N,)
    test: tuple[np.ndarray, np.ndarray]
    classes: tuple[str, ...]  # the train split's class sub-folders, sorted: label k is classes[k]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_task(folder: str | Path, size: int) -> ImageTask:
    """FOLDER/train/<class>/* and FOLDER/test/<class>/* at `size`, the labels those of the train split's classes."""
    train_x, train_y, classes = read_labelled(folder, size, 'train')
    test_x, test_y, _ = read_labelled(folder, size, 'test', classes)
    return ImageTask((train_x, train_y), (test_x, test_y), classes)


__all__ = ['IMAGE_EXTENSIONS', 'RESIZE_FILTER', 'ImageTask', 'ImagesAtSize', 'empty_folder_note', 'fit_image',
           'is_image_folder', 'read_images', 'read_labelled', 'read_task', 'read_unlabelled', 'resize_images',
           'split_folder']
