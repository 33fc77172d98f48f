"""Write a trigger file (docs/DESIGN.md §2.2): a pasted patch (the paper's), a blended pattern, or CTRL's
frequency trigger (§12.1).

    python trigger/make_trigger.py --out trigger/trigger_pt_white_21_10_ap_replace.npz   # the paper's
    python trigger/make_trigger.py --row 0 --col 0 --size 4 --colour 255,0,0 --out trigger/red_0_4.npz
    python trigger/make_trigger.py --kind blend --pattern random --alpha 0.2 --out trigger/blend_random.npz
    python trigger/make_trigger.py --kind blend --image kitty.png --alpha 0.2 --out trigger/blend_kitty.npz
    python trigger/make_trigger.py --kind ctrl --out trigger/ctrl.npz   # CTRL's: magnitude 100, (15,15) (31,31), U, V

Every trigger is applied by `datasets.apply_trigger` as x' = clip(round(x · tm + t), 0, 255) on uint8 images.
The file holds `t` float64 (1, H, W, 3), `tm` (1, H, W, 3) (int64 when it is 0/1, float64 when it blends) and
`info`, strings describing the trigger.

patch  a size x size square of one colour with top-left (row, col): t = colour inside, 0 outside; tm = 0 inside,
       1 outside. The defaults give the paper's trigger: a white 10x10 square at rows and columns 21..30 of 32x32.
blend  an image (--image: an .npz with `x` (H, W, 3) or (1, H, W, 3) uint8, or a .png/.jpg) or a random pattern
       (--pattern random, uniform 0..255, seeded by --seed) mixed in at opacity α (--alpha, default 0.2):
       x' = (1 - α) x + α p, i.e. t = α p and tm = 1 - α everywhere (Chen et al. 2017's blended trigger).
ctrl   CTRL's trigger (Li et al., "An Embarrassingly Simple Backdoor Attack on Self-supervised Learning",
       ICCV 2023; code github.com/meet-cjli/CTRL): RGB -> YUV, orthonormal 2-D DCT-II of every non-overlapping
       window x window block of the chosen channels, + m at the chosen frequencies (u, v) of every block,
       inverse DCT, YUV -> RGB. Every step is linear, so the whole map is x -> x + Δ with Δ independent of x:
           x_yuv = M x                       (M: 3x3 colour matrix, per pixel)
           X     = D x_yuv                   (D: block DCT, orthonormal, per channel: D^-1 = D^T)
           X'    = X + m E                   (E: 1 at the chosen (channel, block, u, v), 0 elsewhere)
           x'    = M^-1 D^T X' = x + M^-1 D^T (m E) = x + Δ
       so the file stores t = Δ (float64, signed) and tm = 1; apply_trigger adds the rounding and clipping to
       0..255 that CTRL's code did in [0, 1] (clamp) after its x * 255 scaling (so m is in grey levels).
       Per block Δ_c = m Σ_(u,v) b_u b_v^T, b_k the k-th orthonormal DCT basis vector (length window).

CTRL's code and this implementation (main_train.py -> utils/frequency.py PoisonFre.Poison_Frequency_Diff,
the path its README runs; utils/image.py, an OpenCV YCrCb path, is not used by main_train.py):
- colour: kornia 0.6.5's rgb_to_yuv, M = [[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]],
  and yuv_to_rgb, N = [[1, 0, 1.14], [1, -0.396, -0.581], [1, 2.029, 0]]. N is a rounded inverse of M
  (N M - I has entries up to 1.4e-3), so the code's map is x -> N M x + N D^T(m E): it also moves a pixel by
  up to 0.7 grey levels as a function of its own colour (never a grey pixel). The default here is the exact
  inverse M^-1, so that the only change is the one made to the DCT coefficients, as the construction (paper
  and code) intends; --yuv_inverse kornia uses N for Δ (the code's trigger, without that sub-grey-level colour
  term, which no x-independent trigger file can hold; Δ moves by under 0.03 grey levels).
- DCT: torch-dct's dct_2d(norm='ortho') over non-overlapping window x window blocks, the same orthonormal
  DCT-II as here; --window defaults to the image size (32), as --window_size 32 in CTRL's README. In the
  code the frequency positions are offsets inside each block (w + u, h + v), so they must be smaller than
  the window (the code's default (15, 15) and (31, 31) with a smaller window writes into the neighbouring
  block or past the image); here that is refused.
- defaults: --magnitude 100 (main_train.py's default and the README's), positions 15 and 31 used as (15, 15)
  and (31, 31) (the README's --trigger_position 15 31), channels 1 2 = U, V (the README's --channel 1 2).
- the code keeps the poisoned images as floats; a trigger file applied to uint8 data rounds to whole grey levels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ''):  # run as `python trigger/make_trigger.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.ctrl import YUV_CHANNELS, YUV_INVERSES, ctrl_delta  # noqa: E402
from core.cli import run_main  # noqa: E402
from core.errors import UsageError  # noqa: E402
from core.files import save_npz_atomic  # noqa: E402
from datasets import DataError, load_trigger, read_npz  # noqa: E402
from datasets.triggers import MAX_ADDITIVE  # noqa: E402

KINDS = ('patch', 'blend', 'ctrl')
NAMED_COLOURS = {'white': (255, 255, 255), 'black': (0, 0, 0)}
# The defaults of each kind's flags: a flag of another kind is refused rather than ignored.
KIND_DEFAULTS = {
    'patch': {'row': 21, 'col': 21, 'size': 10, 'colour': 'white'},
    'blend': {'image': None, 'pattern': None, 'alpha': 0.2, 'seed': 0},
    'ctrl': {'magnitude': 100.0, 'frequencies': ['15,15', '31,31'], 'channels': [1, 2], 'window': None,
             'yuv_inverse': 'exact'},
}


# ------------------------------------------------------------------------------------------------ patch

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
    """The patch: (t float64 (1, S, S, 3), tm int64 (1, S, S, 3)) for a size x size square at (row, col)."""
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


# ------------------------------------------------------------------------------------------------ blend

def blend_trigger(pattern: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """x' = (1 - α) x + α p: (t = α p, tm = 1 - α), both float64 (1, S, S, 3), for a pattern p (S, S, 3) 0..255."""
    if not 0 < alpha <= 1:
        raise UsageError(f'--alpha must lie in (0, 1] (the opacity of the pattern), got {alpha}')
    patch = alpha * pattern.astype(np.float64)[None]
    mask = np.full(patch.shape, 1.0 - alpha)
    return patch, mask


def random_pattern(image_size: int, seed: int) -> np.ndarray:
    """Uniform integers 0..255, uint8 (S, S, 3), from numpy's default generator seeded with `seed`."""
    return np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)


def read_pattern(path: str | Path, image_size: int) -> np.ndarray:
    """An image file as uint8 (S, S, 3): an .npz with `x` (S, S, 3) or (1, S, S, 3), or a picture PIL reads."""
    path = Path(path)
    if path.suffix.lower() == '.npz':
        x = read_npz(path, ('x',))['x']
        if x.ndim == 4 and len(x) == 1:
            x = x[0]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
            raise DataError(f"{path}: 'x' must be one uint8 image (H, W, 3) or (1, H, W, 3), found "
                            f'{x.dtype} {x.shape}')
    else:
        from PIL import Image, UnidentifiedImageError
        if not path.is_file():
            raise DataError(f'{path}: no such file')
        try:
            with Image.open(path) as image:
                x = np.asarray(image.convert('RGB'))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f'{path}: not an image PIL can read ({error})') from None
    if x.shape[:2] != (image_size, image_size):
        raise DataError(f'{path}: image is {x.shape[0]}x{x.shape[1]}, expected {image_size}x{image_size} '
                        '(resize it first, or pass --image_size)')
    return x


# ------------------------------------------------------------------------------------------------ ctrl

def parse_frequencies(items: list[str], window: int) -> list[tuple[int, int]]:
    """['15,15', '31,31'] -> [(15, 15), (31, 31)], each position inside a window x window block, no repeats."""
    frequencies = []
    for item in items:
        parts = item.split(',')
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise UsageError(f"--frequencies: expected positions u,v (e.g. 15,15 31,31), got '{item}'")
        u, v = (int(part) for part in parts)
        if u >= window or v >= window:
            raise UsageError(f'--frequencies {u},{v}: outside a {window}x{window} window (positions 0..{window - 1})')
        if (u, v) in frequencies:
            raise UsageError(f'--frequencies lists {u},{v} twice')
        frequencies.append((u, v))
    return frequencies


def ctrl_trigger(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(t float64 (1, S, S, 3), tm int64 ones, info) for the ctrl flags."""
    window = args.image_size if args.window is None else args.window
    if window < 1 or args.image_size % window:
        raise UsageError(f'--window {window}: must be at least 1 and divide --image_size {args.image_size}')
    channels = sorted(set(args.channels))
    if not channels or any(c not in (0, 1, 2) for c in channels):
        raise UsageError(f'--channels: expected YUV channel numbers 0 (Y), 1 (U), 2 (V), got {args.channels}')
    if not np.isfinite(args.magnitude):
        raise UsageError(f'--magnitude must be finite, got {args.magnitude}')
    frequencies = parse_frequencies(args.frequencies, window)
    delta = ctrl_delta(args.image_size, window, frequencies, channels, args.magnitude,
                       YUV_INVERSES[args.yuv_inverse])
    if np.abs(delta).max() > MAX_ADDITIVE:
        raise UsageError(f'--magnitude {args.magnitude:g}: the trigger would change a pixel by '
                         f'{np.abs(delta).max():.0f} grey levels, more than 255')
    info = ['ctrl', f'magnitude={args.magnitude:g}',
            'frequencies=' + ' '.join(f'{u},{v}' for u, v in frequencies),
            'channels=' + ','.join(YUV_CHANNELS[c] for c in channels), f'window={window}',
            f'yuv=kornia-0.6.5 rgb_to_yuv, {args.yuv_inverse} inverse']
    return delta[None], np.ones(delta[None].shape, dtype=np.int64), info


# ------------------------------------------------------------------------------------------------ command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--kind', default='patch', choices=KINDS,
                        help='patch (the paper\'s, pasted), blend (a pattern mixed in) or ctrl (CTRL\'s frequency '
                             'trigger) (default: patch)')
    parser.add_argument('--image_size', default=32, type=int, help='height and width of the images (default: 32)')
    parser.add_argument('--info', nargs='+', default=None, metavar='TEXT',
                        help="strings stored as 'info' (default: a description, e.g. white_21_10 replace)")
    parser.add_argument('--out', required=True, metavar='PATH', help='the trigger .npz to write')
    parser.add_argument('--force', action='store_true', help='overwrite an existing --out')

    patch = parser.add_argument_group('--kind patch')
    patch.add_argument('--row', type=int, help="top row of the patch (default: 21, the paper's)")
    patch.add_argument('--col', type=int, help="left column of the patch (default: 21, the paper's)")
    patch.add_argument('--size', type=int, help='side of the square patch in pixels (default: 10)')
    patch.add_argument('--colour', '--color', metavar='white|black|R,G,B', help='patch colour (default: white)')

    blend = parser.add_argument_group('--kind blend (one of --image, --pattern)')
    blend.add_argument('--image', metavar='PATH',
                       help='the pattern: an .npz with x (H, W, 3) or (1, H, W, 3) uint8, or a .png/.jpg')
    blend.add_argument('--pattern', choices=('random',), help='the pattern: uniform random 0..255, seeded by --seed')
    blend.add_argument('--alpha', type=float, help='opacity α of the pattern, in (0, 1] (default: 0.2)')
    blend.add_argument('--seed', type=int, help='seed of --pattern random (default: 0)')

    ctrl = parser.add_argument_group('--kind ctrl')
    ctrl.add_argument('--magnitude', type=float,
                      help='added to each chosen DCT coefficient, in grey levels (default: 100, CTRL\'s)')
    ctrl.add_argument('--frequencies', nargs='+', metavar='U,V',
                      help='DCT positions (row, column frequency) within each window (default: 15,15 31,31)')
    ctrl.add_argument('--channels', nargs='+', type=int, metavar='C',
                      help='YUV channels to perturb: 0 Y, 1 U, 2 V (default: 1 2)')
    ctrl.add_argument('--window', type=int,
                      help='side of the non-overlapping DCT windows (default: the image size)')
    ctrl.add_argument('--yuv_inverse', choices=sorted(YUV_INVERSES),
                      help='YUV -> RGB: the exact inverse of the RGB -> YUV matrix, or kornia 0.6.5\'s rounded '
                           "one as CTRL's code (default: exact)")
    return parser


def resolve_kind_flags(args: argparse.Namespace) -> None:
    """Fill in the defaults of --kind's flags; a flag given for another kind is an error, not ignored."""
    if args.kind == 'blend' and args.image is not None and args.seed is not None:
        raise UsageError('--seed applies to --pattern random, not to --image')
    for kind, defaults in KIND_DEFAULTS.items():
        for flag, default in defaults.items():
            given = getattr(args, flag) is not None
            if given and kind != args.kind:
                raise UsageError(f'--{flag} applies to --kind {kind}, not to --kind {args.kind}')
            if not given:
                setattr(args, flag, default)


def build(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(t, tm, default info, a one-line description) for the parsed flags."""
    if args.image_size < 1:
        raise UsageError(f'--image_size must be at least 1, got {args.image_size}')
    if args.kind == 'patch':
        colour_name, rgb = parse_colour(args.colour)
        patch, mask = make_trigger(args.image_size, args.row, args.col, args.size, rgb)
        return (patch, mask, default_info(colour_name, args.row, args.col, args.size),
                f'{args.size}x{args.size} {colour_name} patch at rows {args.row}..{args.row + args.size - 1}, '
                f'columns {args.col}..{args.col + args.size - 1} of {args.image_size}x{args.image_size}')
    if args.kind == 'blend':
        if (args.image is None) == (args.pattern is None):
            raise UsageError('--kind blend needs exactly one of --image PATH and --pattern random')
        if args.image is not None:
            pattern, source = read_pattern(args.image, args.image_size), f'image={Path(args.image).name}'
        else:
            pattern, source = random_pattern(args.image_size, args.seed), f'pattern=random seed={args.seed}'
        patch, mask = blend_trigger(pattern, args.alpha)
        return (patch, mask, ['blend', f'alpha={args.alpha:g}', source],
                f'{source} blended at opacity {args.alpha:g} over {args.image_size}x{args.image_size}')
    patch, mask, info = ctrl_trigger(args)
    return (patch, mask, info, f"CTRL trigger ({', '.join(info[1:])}), largest change "
                               f'{np.abs(patch).max():.2f} grey levels')


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f'{out} already exists; pass --force to overwrite')
    resolve_kind_flags(args)
    patch, mask, info, description = build(args)
    info = np.array(args.info or info)
    save_npz_atomic(out, {'t': patch, 'tm': mask, 'info': info},
                    check=lambda path: load_trigger(path, image_size=args.image_size))
    print(f'wrote {out}: {description}, info {info.tolist()}')


if __name__ == '__main__':
    run_main(main)
