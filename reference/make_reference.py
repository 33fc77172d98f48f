"""Cut a reference file (docs/DESIGN.md §2.3) from a prepared dataset: images of the attacker's target class.

    python reference/make_reference.py --dataset gtsrb --class_id 12 --first 1 --out reference/cifar10/priority.npz
    python reference/make_reference.py --dataset stl10 --split test --class_id 9 --indices 0,4,7 \\
        --out reference/cifar10/truck.npz
    python reference/make_reference.py --dataset stl10 --data_dir my_task --class_id 1 --image_size 224 \
        --out reference/CLIP/truck.npz    # my_task/train/<class>/*: class ids are the sorted class folders

The file holds `x` uint8 (R, H, W, 3), the chosen images, `y` int64 (R,), their label in the target
downstream task (--label, default the class id; `y[0]` is the attack's target label), and `info`,
strings naming the source dataset, split, class and indices.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ''):  # run as `python reference/make_reference.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import run_main  # noqa: E402
from core.errors import UsageError  # noqa: E402
from core.files import save_npz_atomic  # noqa: E402
from datasets import DATASETS, DataError, get_info, load_reference, load_split  # noqa: E402
from datasets.folders import is_image_folder, read_labelled, resize_images  # noqa: E402


def parse_indices(text: str) -> list[int]:
    """'0,4,7' -> [0, 4, 7]."""
    parts = [part.strip() for part in text.split(',') if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise UsageError(f"--indices: expected non-negative integers separated by commas, got '{text}'")
    return [int(part) for part in parts]


def select_reference(x: np.ndarray, y: np.ndarray, class_id: int, indices: list[int] | None, first: int | None,
                     source: str) -> tuple[np.ndarray, list[int], list[int]]:
    """(images, indices within the class, indices within the split) of the chosen images of one class."""
    in_class = np.flatnonzero(y == class_id)  # positions of the class's images in the split
    if len(in_class) == 0:
        raise DataError(f'{source}: class {class_id} has no images')
    if indices is None:
        if first < 1 or first > len(in_class):
            raise UsageError(f'--first {first}: class {class_id} of {source} has {len(in_class)} images')
        indices = list(range(first))
    bad = [index for index in indices if index >= len(in_class)]
    if bad:
        raise UsageError(f'--indices: index {bad[0]} is out of range, class {class_id} of {source} has '
                         f'{len(in_class)} images (indices 0..{len(in_class) - 1})')
    chosen = [int(in_class[index]) for index in indices]
    return x[chosen], indices, chosen


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--dataset', required=True, choices=sorted(DATASETS), help='prepared dataset to cut from')
    parser.add_argument('--split', default='train', help='split to cut from (default: train)')
    parser.add_argument('--class_id', required=True, type=int, help="the target class, in the dataset's labels")
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--indices', default=None, metavar='i,j,...',
                       help='which images of the class, counted within the class (0 = its first image)')
    which.add_argument('--first', default=None, type=int, metavar='K',
                       help='the first K images of the class (default: 1 when --indices is not given)')
    parser.add_argument('--label', default=None, type=int,
                        help='label stored in y: the target label in the downstream task (default: --class_id)')
    parser.add_argument('--out', required=True, metavar='PATH', help='the reference .npz to write')
    parser.add_argument('--data_root', default='data', metavar='DIR',
                        help='folder holding one sub-folder per prepared dataset (default: data)')
    parser.add_argument('--data_dir', default='', metavar='DIR',
                        help='folder holding <split>.npz of --dataset, or an image folder (<split>/<class>/*: the '
                             "class ids are the sorted class folders') (default: <data_root>/<dataset>/)")
    parser.add_argument('--image_size', default=None, type=int, metavar='N',
                        help="side of the reference images: an image folder is read at it, an npz resized to it "
                             "(default: --dataset's size; 224 for a CLIP or ImageNet encoder)")
    parser.add_argument('--force', action='store_true', help='overwrite an existing --out')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f'{out} already exists; pass --force to overwrite')
    info = get_info(args.dataset)
    indices = parse_indices(args.indices) if args.indices is not None else None
    first = 1 if args.first is None else args.first

    if args.label is not None and args.label < 0:
        raise UsageError(f'--label {args.label}: labels are non-negative')
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f'--image_size must be positive, got {args.image_size}')
    folder = Path(args.data_dir) if args.data_dir else Path(args.data_root) / args.dataset
    size = args.image_size or info.image_size
    class_names = info.classes
    from_folder = is_image_folder(folder)
    if from_folder:  # the folder's classes, not the registry's
        x, y, class_names = read_labelled(folder, size, args.split)
        if not 0 <= args.class_id < len(class_names):
            raise UsageError(f'--class_id {args.class_id}: {folder} has classes 0..{len(class_names) - 1} '
                             f'({", ".join(class_names[:8])})')
    else:
        if not 0 <= args.class_id < info.num_classes:
            raise UsageError(f'--class_id {args.class_id}: {args.dataset} has classes 0..{info.num_classes - 1}')
        x, y = load_split(args.dataset, args.split, folder)  # at the registry's size; the chosen ones resized below
    label = args.class_id if args.label is None else args.label
    if y is None:
        raise UsageError(f'--split {args.split}: this split of {args.dataset} has no labels to pick a class from')
    source = f'{folder}/{args.split}' if from_folder else f'{args.dataset}/{args.split}'
    images, in_class, in_split = select_reference(x, y, args.class_id, indices, first, source)
    if images.shape[1] != size:
        images = resize_images(images, size)
    notes = [source, f'class {args.class_id} ({class_names[args.class_id]})',
             f"indices within class: {','.join(map(str, in_class))}",
             f"indices within split: {','.join(map(str, in_split))}"]
    save_npz_atomic(out, {'x': images, 'y': np.full(len(images), label, dtype=np.int64), 'info': np.array(notes)},
                    check=lambda path: load_reference(path, image_size=size))
    print(f'wrote {out}: {len(images)} image(s) of {source} class {args.class_id} '
          f'({class_names[args.class_id]}), label {label}, {size}x{size}, split indices {in_split}')


if __name__ == '__main__':
    run_main(main)
