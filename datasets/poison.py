r"""Poison a prepared pre-training split with a trigger (data poisoning, e.g. CTRL; docs/DESIGN.md §12.3).

    python trigger/make_trigger.py --kind ctrl --out trigger/ctrl.npz
    python -m datasets.poison --dataset cifar10 --trigger_file trigger/ctrl.npz --target_class 0 \
        --poison_rate 0.01 --seed 0 --out data/cifar10_ctrl
    python train_clean_encoder.py --data_dir data/cifar10_ctrl ...      # stage 0 on it: a backdoored encoder

Of the dataset's pre-training split (N images), n = round(poison_rate · N) (halves rounded up) images of class
--target_class, drawn without replacement by numpy's default generator seeded with --seed, are replaced by
`datasets.apply_trigger(x, load_trigger(--trigger_file))` (trigger 0 of the file); every other image and
every label are kept. This is a clean-label attack: the poisoned images keep their own (target) class.
CTRL's code poisons the *first* n target-class images, with n = floor(poison_rate · N); a random draw needs a
seed but does not depend on the order of the file.

--out DIR receives <split>.npz (the poisoned split), a byte-for-byte copy of each other prepared split of the
dataset (the kNN monitor's test set, ...), and poison.json: the poisoned indices (into the split, ascending),
the trigger file, its sha256 and info, rate, class, seed, count, dataset and split. Every file is written
through a temporary file and a rename. A non-empty DIR is only written into with --overwrite; the source
folder itself never.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from core.cli import StageParser, run_main
from core.errors import UsageError
from core.files import copy_atomic, save_npz_atomic, write_text_atomic

from .npz import check_images, check_labels, load_split, read_npz
from .registry import UNLABELED_SPLITS, DataError, DatasetInfo, get_info, split_path
from .triggers import Trigger, apply_trigger, load_trigger

RECORD = 'poison.json'


def poison_count(rate: float, split_size: int) -> int:
    """n = round(rate · N), halves rounded up: ⌊rate · N + 1/2⌋."""
    return int(math.floor(rate * split_size + 0.5))


def choose_poisoned(labels: np.ndarray, target_class: int, count: int, seed: int) -> np.ndarray:
    """`count` indices i with labels[i] == target_class, drawn without replacement with
    numpy.random.default_rng(seed), ascending. DataError when the class has fewer images."""
    candidates = np.flatnonzero(labels == target_class)
    if len(candidates) < count:
        raise DataError(f'class {target_class} has {len(candidates)} images in the split, fewer than the '
                        f'{count} to poison (lower --poison_rate or choose another --target_class)')
    return np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))


def poison_images(images: np.ndarray, indices: np.ndarray, trigger: Trigger) -> np.ndarray:
    """A copy of `images` (N, H, W, 3) uint8 with trigger 0 applied to images[indices]; the rest unchanged."""
    poisoned = images.copy()
    poisoned[indices] = apply_trigger(images[indices], trigger, 0)
    return poisoned


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def split_checker(info: DatasetInfo):
    """check(path): the written split reads back as a labelled split of this dataset (as load_split checks)."""
    def check(path: Path) -> None:
        arrays = read_npz(path, ('x', 'y'))
        x = check_images(arrays['x'], path, info.image_size)
        check_labels(arrays['y'], len(x), info.num_classes, path)
    return check


def check_request(info: DatasetInfo, args: argparse.Namespace, data_dir: Path, out: Path) -> None:
    """Refuse, before reading any images, what cannot work (one-line errors)."""
    split = info.pretraining_split
    if split in UNLABELED_SPLITS:
        raise DataError(f"{info.name}: its pre-training split '{split}' has no labels, so the target class "
                        'cannot be chosen; poison a labelled dataset (e.g. cifar10)')
    if not 0 < args.poison_rate < 1:
        raise UsageError(f'--poison_rate must lie in (0, 1), got {args.poison_rate}')
    if not 0 <= args.target_class < info.num_classes:
        raise UsageError(f'--target_class {args.target_class}: {info.name} has classes 0..{info.num_classes - 1}')
    if out.exists() and not out.is_dir():
        raise UsageError(f'--out {out}: exists and is not a folder')
    if out.resolve() == data_dir.resolve():
        raise UsageError(f'--out {out} is the source dataset folder; write the poisoned copy elsewhere')
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f'--out {out}: exists and is not empty; pass --overwrite to write into it')


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog='python -m datasets.poison', description=__doc__.split('\n\n')[0],
                         epilog=__doc__.split('\n\n', 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True, help='the prepared dataset to poison (e.g. cifar10)')
    parser.add_argument('--trigger_file', required=True, metavar='PATH', help='the trigger .npz (trigger 0 is used)')
    parser.add_argument('--target_class', required=True, type=int, help='class whose images are poisoned')
    parser.add_argument('--poison_rate', required=True, type=float,
                        help='poisoned images as a fraction of the whole split, in (0, 1) (CTRL: 0.01)')
    parser.add_argument('--seed', default=0, type=int, help='seed of the draw of the poisoned images (default: 0)')
    parser.add_argument('--out', required=True, metavar='DIR', help='folder for the poisoned copy of the dataset')
    parser.add_argument('--data_root', default='data', metavar='DIR',
                        help='folder holding one sub-folder per prepared dataset (default: data)')
    parser.add_argument('--data_dir', default='', metavar='DIR',
                        help="folder holding the dataset's <split>.npz (default: <data_root>/<dataset>/)")
    parser.add_argument('--overwrite', action='store_true', help='write into a non-empty --out')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    info = get_info(args.dataset)
    data_dir = Path(args.data_dir) if args.data_dir else Path(args.data_root) / info.name
    out, split = Path(args.out), info.pretraining_split
    check_request(info, args, data_dir, out)
    trigger = load_trigger(args.trigger_file, image_size=info.image_size)

    images, labels = load_split(info.name, split, data_dir)
    count = poison_count(args.poison_rate, len(images))
    if count == 0:
        raise DataError(f'--poison_rate {args.poison_rate} of {len(images)} images poisons no image')
    indices = choose_poisoned(labels, args.target_class, count, args.seed)
    poisoned = poison_images(images, indices, trigger)

    out.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(out / f'{split}.npz', {'x': poisoned, 'y': labels}, check=split_checker(info))
    copied = [name for name in info.splits if name != split and split_path(info.name, name, data_dir).is_file()]
    for name in copied:
        copy_atomic(split_path(info.name, name, data_dir), out / f'{name}.npz')
    record = {'dataset': info.name, 'split': split, 'source': str(data_dir), 'split_size': len(images),
              'target_class': args.target_class, 'target_class_name': info.classes[args.target_class],
              'poison_rate': args.poison_rate, 'seed': args.seed, 'count': count,
              'trigger_file': str(args.trigger_file), 'trigger_sha256': sha256_of(Path(args.trigger_file)),
              'trigger_info': list(trigger.info), 'trigger_index': 0, 'copied_splits': copied,
              'indices': indices.tolist()}
    write_text_atomic(out / RECORD, json.dumps(record, indent=2) + '\n')
    print(f'wrote {out}: {split}.npz with {count} of {len(images)} images of class {args.target_class} '
          f'({info.classes[args.target_class]}) triggered, copies of {copied}, and {RECORD}')


if __name__ == '__main__':
    run_main(main)
