"""Write a trigger file (SPEC §2.2): one square patch pasted over the image ("replace").

    python trigger/make_trigger.py --out trigger/trigger_pt_white_21_10_ap_replace.npz   # the paper's
    python trigger/make_trigger.py --row 0 --col 0 --size 4 --colour 255,0,0 --out trigger/red_0_4.npz

The file holds `t` float64 (1, H, W, 3), the patch values 0..255 (0 outside the patch), `tm` int64
(1, H, W, 3), 0 inside the patch and 1 elsewhere, and `info`, strings such as ['white_21_10', 'replace'].
A trigger is applied to a uint8 image as x * tm + t. The defaults give the paper's trigger: a white
10x10 square at rows and columns 21..30 of a 32x32 image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ''):  # run as `python trigger/make_trigger.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UsageError, run_main  # noqa: E402
from datasets import load_trigger  # noqa: E402
from datasets.prepare import save_npz_atomic  # noqa: E402

NAMED_COLOURS = {'white': (255, 255, 255), 'black': (0, 0, 0)}


def parse_colour(text: str) -> tuple[str, tuple[int, int, int]]:
    """'white' | 'black' | 'R,G,B' -> (name used in info, (r, g, b))."""
    if text in NAMED_COLOURS:
        return text, NAMED_COLOURS[text]
    parts = text.split(',')
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) <= 255 for part in parts):
        raise UsageError(f"--colour: expected white, black or R,G,B with values 0..255, got '{text}'")
    rgb = tuple(int(part) for part in parts)
    return '-'.join(map(str, rgb)), rgb


def make_trigger(image_size: int, row: int, col: int, size: int,
                 rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(t float64 (1, S, S, 3), tm int64 (1, S, S, 3)) for a size x size patch with top-left (row, col)."""
    if size < 1 or image_size < 1:
        raise UsageError(f'--size and --image_size must be at least 1, got {size} and {image_size}')
    if row < 0 or col < 0 or row + size > image_size or col + size > image_size:
        raise UsageError(f'a {size}x{size} patch at row {row}, column {col} does not fit in a '
                         f'{image_size}x{image_size} image')
    patch = np.zeros((1, image_size, image_size, 3), dtype=np.float64)
    mask = np.ones((1, image_size, image_size, 3), dtype=np.int64)
    patch[:, row:row + size, col:col + size, :] = rgb
    mask[:, row:row + size, col:col + size, :] = 0
    return patch, mask


def default_info(colour_name: str, row: int, col: int, size: int) -> list[str]:
    """The paper's naming: '<colour>_<position>_<size>', position 'row' or 'row-col' when they differ."""
    position = str(row) if row == col else f'{row}-{col}'
    return [f'{colour_name}_{position}_{size}', 'replace']


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--image_size', default=32, type=int, help='height and width of the images (default: 32)')
    parser.add_argument('--row', default=21, type=int, help="top row of the patch (default: 21, the paper's)")
    parser.add_argument('--col', default=21, type=int, help="left column of the patch (default: 21, the paper's)")
    parser.add_argument('--size', default=10, type=int, help="side of the square patch in pixels (default: 10)")
    parser.add_argument('--colour', '--color', default='white', metavar='white|black|R,G,B',
                        help='patch colour (default: white)')
    parser.add_argument('--info', nargs='+', default=None, metavar='TEXT',
                        help="strings stored as 'info' (default: e.g. white_21_10 replace)")
    parser.add_argument('--out', required=True, metavar='PATH', help='the trigger .npz to write')
    parser.add_argument('--force', action='store_true', help='overwrite an existing --out')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f'{out} already exists; pass --force to overwrite')
    colour_name, rgb = parse_colour(args.colour)
    patch, mask = make_trigger(args.image_size, args.row, args.col, args.size, rgb)
    info = np.array(args.info or default_info(colour_name, args.row, args.col, args.size))
    save_npz_atomic(out, {'t': patch, 'tm': mask, 'info': info},
                    check=lambda path: load_trigger(path, image_size=args.image_size))
    print(f'wrote {out}: {args.size}x{args.size} {colour_name} patch at rows {args.row}..{args.row + args.size - 1}, '
          f'columns {args.col}..{args.col + args.size - 1} of {args.image_size}x{args.image_size}, '
          f'info {info.tolist()}')


if __name__ == '__main__':
    run_main(main)
