"""A downstream task as stage 3 reads it (docs/DESIGN.md §7): its training and test images, the triggered test set
(trigger 0 on every test image) and the reference images, each checked before any encoder runs."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UsageError

from .folders import ImagesAtSize, is_image_folder, read_task
from .npz import load_split
from .registry import DataError, get_info
from .torch_datasets import triggered_copy
from .triggers import Reference, load_reference, load_trigger


@dataclass
class ProbeData:
    """Downstream images (uint8) and labels, the triggered test set and the reference images."""
    train: tuple[np.ndarray, np.ndarray]  # uint8 (N, H, W, 3), int64 (N,)
    test: tuple[np.ndarray, np.ndarray]
    triggered_test: np.ndarray  # uint8 (N_test, H, W, 3), trigger 0 applied
    reference_images: np.ndarray | None  # uint8 (R, H, W, 3)
    num_classes: int
    target: int  # the attack's target class


def target_label(reference_label: int, reference: Reference | None, dataset: str, num_classes: int) -> int:
    """--reference_label, checked against the classes; -1 takes y[0] of the reference file."""
    if reference_label == -1 and reference is not None:
        return reference.target_label  # load_reference checked it against the classes
    if not 0 <= reference_label < num_classes:
        raise UsageError(f'--reference_label {reference_label}: the target class must lie in 0..{num_classes - 1} '
                         f'({dataset} has {num_classes} classes)'
                         + ('; give it, or a --reference_file' if reference_label == -1 else ''))
    if reference is not None and reference.target_label != reference_label:
        print(f'warning: --reference_label {reference_label} differs from the label {reference.target_label} '
              'of --reference_file; using --reference_label', file=sys.stderr)
    return reference_label


def load_probe_data(dataset: str, data_dir: Path, trigger_file: str, reference_file: str, reference_label: int,
                    image_size: int | None = None) -> ProbeData:
    """Load and validate every input of a downstream task; the target is `reference_label`, or with -1 the label
    of the reference file.

    `image_size` is a real-world encoder's input (224): the downstream images are brought to it (an npz's 32-px
    images resized batch by batch when encoded, `datasets.ImagesAtSize`; the released code reads `*_224.npz` files
    resized beforehand), the trigger must be of that size, the references are resized to it. `data_dir` may be a
    labelled image folder, FOLDER/train/<class>/* and FOLDER/test/<class>/* (datasets/folders.py), whose class
    sub-folders, not `dataset`, give the classes.
    """
    info = get_info(dataset)
    size = image_size or info.image_size
    folder_task = is_image_folder(data_dir)  # a labelled image folder, else <split>.npz files
    if folder_task:
        task = read_task(data_dir, size)
        train, test, num_classes = task.train, task.test, task.num_classes
        print(f'downstream task: {data_dir}, {num_classes} classes ({", ".join(task.classes[:10])}'
              f'{" ..." if num_classes > 10 else ""}), {len(train[0])} training and {len(test[0])} test images')
    else:
        train, test = (load_split(info.name, split, data_dir, image_size) for split in ('train', 'test'))
        num_classes = info.num_classes
    for split, (x, _) in (('train', train), ('test', test)):
        if len(x) == 0:
            raise DataError(f'{data_dir}/{split}.npz: holds no images')
    trigger = load_trigger(trigger_file, size)
    reference = None
    if reference_file:
        reference = load_reference(reference_file, num_classes, info.image_size, resize_to=image_size)
    target = target_label(reference_label, reference, str(data_dir) if folder_task else info.name, num_classes)
    test_x = test[0]
    if isinstance(test_x, ImagesAtSize):  # triggered after the resize, as the released code's 224-px test sets
        triggered = ImagesAtSize(test_x.images, test_x.size, lambda batch: triggered_copy(batch, trigger, 0))
    else:
        triggered = triggered_copy(test_x, trigger, 0)
    return ProbeData(train, test, triggered, reference.x if reference is not None else None, num_classes, target)
