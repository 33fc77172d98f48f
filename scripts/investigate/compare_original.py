#!/usr/bin/env python
"""Compare the speed of this implementation with the original MIMIC code on the same machine.

Both sides run the measurements of scripts/benchmark.py with the same synthetic images, batches, timed
steps, epochs, DataLoader workers and CPU threads: ours in this process, the original's own training
functions in a child process (scripts/investigate/original_harness.py says which functions and how). --original is
a checkout of the original implementation (https://github.com/wssun/MIMIC); nothing of it is copied here.

    python -m scripts.investigate.compare_original --original ~/src/MIMIC --quick --device cpu
    python -m scripts.investigate.compare_original --original ~/src/MIMIC --device cuda --num_workers 8

Stdout is one JSON line {"ours": {...}, "original": {...}, "speedup": {...}}; a speedup above 1 means ours
is faster (throughput ours/original, seconds original/ours). A Markdown table of the same goes to stderr.
Each side runs its own defaults for the device: on CUDA ours takes its fast paths (--augment auto, and
--amp or --compile if given), the original its PIL workers and deterministic cuDNN; the table's first
line says which.
The original has only ResNet18 at width 64, so --arch and --width cannot change.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ''):  # run as `python scripts/investigate/compare_original.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts import benchmark  # noqa: E402
from scripts.investigate import original_harness  # noqa: E402  (imports nothing of the original until its main() runs)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.cli import seed_everything  # noqa: E402
from core.cli import run_main  # noqa: E402
from core.device import resolve_device  # noqa: E402
from core.errors import UsageError  # noqa: E402
from models import PAPER_WIDTH  # noqa: E402

HARNESS = Path(__file__).resolve().parent / 'original_harness.py'
ORIGINAL_FILES = ('MIMIC.py', 'train_clean_encoder.py', 'train_badencoder.py', 'models/scheduler.py',
                  'datasets/backdoor_dataset.py', 'datasets/cifar10_dataset.py')
# what the harness passes on to the original's measurements (the counts resolved as benchmark.py does)
COUNTS = tuple(original_harness.COUNT_HELP)
COMPARED = (*benchmark.FIGURES, 'simclr_forwards_per_step', 'badencoder_encoder_forwards_per_step',
            'mimic_student_forwards_per_step', 'mimic_teacher_forwards_per_step', 'mi_network_passes_per_image')


def get_args_parser() -> argparse.ArgumentParser:
    # the original has no baseline defences: ours are timed only when asked for
    parser = benchmark.get_args_parser(defences='none', defences_help='default: none; the original has none')
    parser.description = ('Time this implementation and the original MIMIC code on this machine with the same '
                          'data and settings; prints one JSON line.')
    parser.add_argument('--original', required=True, metavar='DIR',
                        help='a checkout of the original implementation (https://github.com/wssun/MIMIC)')
    return parser


def check_original(path: Path) -> None:
    missing = [name for name in ORIGINAL_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(f'--original {path}: not a checkout of the original MIMIC code (no {", ".join(missing)}; '
                         'clone https://github.com/wssun/MIMIC)')


def write_original_layout(folder: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Path]:
    """The benchmark's images, trigger and reference as the files the original reads: data/train.npz and
    test.npz (x uint8 (N, 32, 32, 3), y (N, 1)), a trigger file (t, tm) and a reference file (x, y)."""
    data = folder / 'data'
    data.mkdir()
    np.savez(data / 'train.npz', x=images, y=labels[:, None])
    np.savez(data / 'test.npz', x=images[:10], y=labels[:10, None])  # read at start-up, never timed
    trigger = benchmark.paper_trigger()
    np.savez(folder / 'trigger.npz', t=trigger.patch, tm=trigger.mask)
    np.savez(folder / 'reference.npz', x=images[-1:], y=np.array([benchmark.GTSRB_PRIORITY]))  # as bench_badencoder
    return {'data_dir': data, 'trigger_file': folder / 'trigger.npz', 'reference_file': folder / 'reference.npz'}


def time_original(args: argparse.Namespace, device: torch.device, files: dict[str, Path]) -> dict:
    """Run the harness on the original in a child process whose path holds the original, not this project."""
    command = [sys.executable, str(HARNESS), '--original', str(Path(args.original).resolve()),
               '--device', str(device), *[item for name, path in files.items() for item in (f'--{name}', str(path))],
               *[item for name in COUNTS for item in (f'--{name}', str(getattr(args, name)))]]
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    if args.no_progress:
        env['TQDM_DISABLE'] = '1'
    result = subprocess.run(command, cwd=files['data_dir'].parent, env=env, stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise UsageError(f'the original implementation failed (exit status {result.returncode}); '
                         'its messages are above')
    return json.loads(lines[-1])


def speedups(ours: dict, original: dict) -> dict:
    """ours/original for throughputs (*_per_s), original/ours for times (*_s): above 1 means ours is faster."""
    ratios = {}
    for key in benchmark.FIGURES:
        if key in ours and key in original:
            ratios[key] = ours[key] / original[key] if key.endswith('_per_s') else original[key] / ours[key]
    return ratios


def table(ours: dict, original: dict, ratios: dict) -> str:
    rows = [f'ours: augmentation {ours["augment"]}, amp {ours["amp"]}, compile {ours["compile"]}; the original: '
            f'PIL augmentation, float32; both: {ours["device_name"]}, {ours["threads"]} threads, '
            f'{ours["num_workers"]} loader workers', '',
            '| figure | original | ours | speedup |', '|---|---|---|---|']
    for key in COMPARED:
        if key in ours and key in original:
            speedup = f'{ratios[key]:.1f}x' if key in ratios else ''
            rows.append(f'| `{key}` | {original[key]:.4g} | {ours[key]:.4g} | {speedup} |')
        elif key in ours:
            rows.append(f'| `{key}` | not measured | {ours[key]:.4g} | |')
    return '\n'.join(rows)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.arch != 'resnet18' or args.width != PAPER_WIDTH:
        raise UsageError(f'the original has only resnet18 at width {PAPER_WIDTH}; '
                         f'--arch {args.arch} --width {args.width} cannot be compared')
    original_dir = Path(args.original)
    check_original(original_dir)
    benchmark.defence_names(args)  # before the original's side runs for minutes
    benchmark.resolve_counts(args)
    seed_everything(args.seed)
    device = resolve_device(args.device, args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)

    images, labels = benchmark.image_pool(args)
    with tempfile.TemporaryDirectory(prefix='compare_original.') as folder:
        files = write_original_layout(Path(folder), images, labels)
        print('-- the original', file=sys.stderr)  # first: a checkout that fails to run fails fast
        original = time_original(args, device, files)
    print('-- ours', file=sys.stderr)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        figures = benchmark.benchmark(args, device)
    ours = benchmark.report(figures, args, device, time.perf_counter() - start)
    original['checkout'], original['commit'] = str(original_dir.resolve()), benchmark.git_commit(original_dir)
    ratios = speedups(ours, original)
    print(table(ours, original, ratios), file=sys.stderr)
    print(json.dumps({'ours': ours, 'original': original, 'speedup': ratios}), flush=True)


if __name__ == '__main__':
    run_main(main)
