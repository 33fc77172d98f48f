"""Triggers beyond a pasted patch: apply_trigger's formula, load_trigger's ranges, make_trigger --kind blend|ctrl."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import ctrl
from conftest import run_script
from core.errors import UsageError
from datasets import DataError, Trigger, apply_trigger, load_trigger
from trigger import make_trigger


def save(path, t, tm, **extra):
    np.savez(path, t=t, tm=tm, **extra)
    return path


def both_paths(x: np.ndarray, trigger: Trigger, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return apply_trigger(x, trigger, index), apply_trigger(torch.from_numpy(x), trigger, index).numpy()


# ------------------------------------------------------------------------------------------ apply_trigger

def test_apply_trigger_blends_adds_rounds_and_clips(tmp_path):
    """x' = clip(round(x · tm + t), 0, 255), by hand, pixel by pixel (2x2 image, same value in all channels)."""
    tm = np.array([[0.5, 1.0], [1.0, 1.0]])
    t = np.array([[10.25, -20.0], [200.0, 0.5]])
    trigger = load_trigger(save(tmp_path / 't.npz', np.repeat(t[..., None], 3, -1), np.repeat(tm[..., None], 3, -1)))
    assert trigger.mask.dtype == np.float64 and trigger.patch.dtype == np.float64
    x = np.repeat(np.array([[[100, 10], [100, 2]], [[7, 250], [55, 3]]], dtype=np.uint8)[..., None], 3, -1)
    expected = np.repeat(np.array([[[60, 0], [255, 2]],  # 60.25 -> 60; -10 -> 0; 300 -> 255; 2.5 -> 2 (to even)
                                   [[14, 230], [255, 4]]], dtype=np.uint8)[..., None], 3, -1)  # 13.75; 3.5 -> 4
    for out in both_paths(x, trigger):
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(x[0, 0, 0], [100, 100, 100])  # the input is untouched


def test_apply_trigger_numpy_and_torch_agree_on_fractional_triggers(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.uniform(-255, 255, (2, 32, 32, 3))
    tm = rng.uniform(0, 1, (2, 32, 32, 3))
    trigger = load_trigger(save(tmp_path / 't.npz', t, tm), image_size=32)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    for index in (0, 1):
        numpy_out, torch_out = both_paths(x, trigger, index)
        exact = np.clip(np.rint(x * tm[index] + t[index]), 0, 255)
        np.testing.assert_array_equal(numpy_out, exact)
        # float32 on torch: one grey level at most, and only where the sum is a rounding error from a half
        difference = np.abs(numpy_out.astype(int) - torch_out.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_load_trigger_accepts_blend_and_additive_and_reads_tm_as_float(tmp_path):
    t = np.full((1, 32, 32, 3), -255.0)
    t[..., 0] = 255.0
    trigger = load_trigger(save(tmp_path / 't.npz', t, np.full((1, 32, 32, 3), 0.25, dtype=np.float32)), 32)
    assert trigger.mask.dtype == np.float64 and (trigger.mask == 0.25).all()
    assert trigger.patch.min() == -255 and trigger.patch.max() == 255
    integer_mask = load_trigger(save(tmp_path / 'i.npz', np.zeros((1, 8, 8, 3)), np.ones((1, 8, 8, 3), np.int64)))
    assert integer_mask.mask.dtype == np.float64 and integer_mask.image_size == 8 and len(integer_mask) == 1


@pytest.mark.parametrize('case, t, tm, words', [
    ('mask above 1', 0.0, 1.5, ['between 0 and 1', '1..1.5']),
    ('mask below 0', 0.0, -0.1, ['between 0 and 1', '-0.1..1']),
    ('mask nan', 0.0, np.nan, ['non-finite', 'between 0 and 1']),
    ('additive below -255', -300.0, 1.0, ['-255..255', '-300..0']),
    ('additive above 255', 255.5, 1.0, ['-255..255', '0..255.5']),
    ('patch inf', np.inf, 1.0, ['non-finite', '-255..255']),
])
def test_load_trigger_rejects_values_outside_the_ranges(tmp_path, case, t, tm, words):
    patch, mask = np.zeros((1, 32, 32, 3)), np.ones((1, 32, 32, 3))
    patch[0, 3, 4, 1], mask[0, 5, 6, 2] = t, tm
    path = save(tmp_path / 'trigger.npz', patch, mask)
    with pytest.raises(DataError) as error:
        load_trigger(path, image_size=32)
    message = str(error.value)
    assert message.startswith(str(path)) and '\n' not in message
    for word in words:
        assert word in message, (case, message)


# ------------------------------------------------------------------------------------------ --kind blend

def test_blend_with_an_npz_image_by_hand(tmp_path):
    np.savez(tmp_path / 'grey.npz', x=np.full((1, 32, 32, 3), 200, dtype=np.uint8))
    out = tmp_path / 'blend.npz'
    make_trigger.main(['--kind', 'blend', '--image', str(tmp_path / 'grey.npz'), '--alpha', '0.25', '--out', str(out)])
    trigger = load_trigger(out, image_size=32)
    assert (trigger.patch == 50).all() and (trigger.mask == 0.75).all()  # t = α p, tm = 1 - α
    assert trigger.info == ('blend', 'alpha=0.25', 'image=grey.npz')
    x = np.full((2, 32, 32, 3), 100, dtype=np.uint8)
    for triggered in both_paths(x, trigger):
        assert (triggered == 125).all()  # 0.75 · 100 + 0.25 · 200


def test_blend_with_a_png_and_with_a_random_pattern(tmp_path):
    pattern = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pattern).save(tmp_path / 'pattern.png')
    make_trigger.main(['--kind', 'blend', '--image', str(tmp_path / 'pattern.png'), '--image_size', '16',
                       '--out', str(tmp_path / 'png.npz')])
    trigger = load_trigger(tmp_path / 'png.npz', image_size=16)
    np.testing.assert_allclose(trigger.patch[0], 0.2 * pattern, rtol=0, atol=1e-12)  # default α = 0.2
    np.testing.assert_allclose(trigger.mask, 0.8, rtol=0, atol=1e-12)

    for name, seed in (('a', '7'), ('b', '7'), ('c', '8')):
        make_trigger.main(['--kind', 'blend', '--pattern', 'random', '--seed', seed,
                           '--out', str(tmp_path / f'{name}.npz')])
    a, b, c = (load_trigger(tmp_path / f'{name}.npz') for name in 'abc')
    assert np.array_equal(a.patch, b.patch) and not np.array_equal(a.patch, c.patch)
    values = a.patch / 0.2
    np.testing.assert_allclose(values, np.round(values), atol=1e-9)  # α times integers 0..255
    assert values.min() >= 0 and values.max() <= 255 and len(np.unique(np.round(values))) > 200
    assert a.info == ('blend', 'alpha=0.2', 'pattern=random seed=7')


@pytest.mark.parametrize('flags, message', [
    (['--kind', 'blend'], 'exactly one of --image'),
    (['--kind', 'blend', '--pattern', 'random', '--image', 'x.png'], 'exactly one of --image'),
    (['--kind', 'blend', '--pattern', 'random', '--alpha', '0'], r'--alpha must lie in \(0, 1\]'),
    (['--kind', 'blend', '--pattern', 'random', '--alpha', '1.5'], r'--alpha must lie in \(0, 1\]'),
    (['--kind', 'blend', '--image', 'x.png', '--seed', '1'], '--seed applies to --pattern random'),
    (['--kind', 'blend', '--pattern', 'random', '--size', '3'], '--size applies to --kind patch'),
    (['--magnitude', '50'], '--magnitude applies to --kind ctrl, not to --kind patch'),
])
def test_make_trigger_refuses_flags_that_cannot_work(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        make_trigger.main(['--out', str(tmp_path / 't.npz'), *flags])
    assert not list(tmp_path.iterdir())


def test_blend_image_of_another_size_is_refused(tmp_path):
    np.savez(tmp_path / 'big.npz', x=np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(DataError, match='image is 64x64, expected 32x32'):
        make_trigger.main(['--kind', 'blend', '--image', str(tmp_path / 'big.npz'), '--out', str(tmp_path / 't.npz')])
    assert not (tmp_path / 't.npz').exists()


# ------------------------------------------------------------------------------------------ --kind ctrl

def test_dct_matrix_is_the_orthonormal_dct_ii():
    np.testing.assert_allclose(ctrl.dct_matrix(2), [[0.5 ** 0.5, 0.5 ** 0.5], [0.5 ** 0.5, -0.5 ** 0.5]],
                               atol=1e-15)
    c4 = ctrl.dct_matrix(4)
    assert c4[1, 0] == pytest.approx(0.5 ** 0.5 * math.cos(math.pi / 8), abs=1e-15)
    assert c4[3, 2] == pytest.approx(0.5 ** 0.5 * math.cos(math.pi * 15 / 8), abs=1e-15)
    c32 = ctrl.dct_matrix(32)
    np.testing.assert_allclose(c32 @ c32.T, np.eye(32), atol=1e-13)
    flat = np.full((32, 32), 3.0)
    coefficients = c32 @ flat @ c32.T
    assert coefficients[0, 0] == pytest.approx(3.0 * 32) and np.abs(coefficients).ravel()[1:].max() < 1e-12


def test_ctrl_dc_term_of_y_shifts_every_pixel_by_magnitude_over_window(tmp_path):
    """(0, 0) of Y, m = 32, window 32: Δ_Y = 32 · (1/√32)² = 1 everywhere, and a Y-only change is grey: M^-1 e_Y
    = (1, 1, 1) (M's U and V rows sum to 0) for the exact inverse, and kornia's inverse has (1, 1, 1) as first
    column too."""
    for inverse in ('exact', 'kornia'):
        out = tmp_path / f'{inverse}.npz'
        make_trigger.main(['--kind', 'ctrl', '--magnitude', '32', '--frequencies', '0,0', '--channels', '0',
                           '--yuv_inverse', inverse, '--out', str(out)])
        trigger = load_trigger(out, image_size=32)
        np.testing.assert_allclose(trigger.patch, 1.0, atol=1e-12)
        assert (trigger.mask == 1).all()
    x = np.full((1, 32, 32, 3), 40, dtype=np.uint8)
    x[0, 0, 0] = 255
    for triggered in both_paths(x, trigger):
        assert triggered[0, 0, 0].tolist() == [255] * 3 and (triggered[0, 1:] == 41).all()


def test_ctrl_single_frequency_by_hand_and_windowing():
    magnitude = 100.0
    delta = ctrl.ctrl_delta(32, 32, [(31, 31)], [0], magnitude, ctrl.YUV_INVERSES['exact'])
    for r, c in ((0, 0), (5, 17), (31, 2)):
        by_hand = magnitude * (2 / 32) * math.cos(math.pi * (2 * r + 1) * 31 / 64) * math.cos(
            math.pi * (2 * c + 1) * 31 / 64)
        np.testing.assert_allclose(delta[r, c], [by_hand] * 3, atol=1e-12)
    assert abs(delta[0, 0, 0]) == pytest.approx(6.25 * math.cos(31 * math.pi / 64) ** 2)

    # window 8 over 32x32: the same 8x8 block in all 16 windows
    tiled = ctrl.ctrl_delta(32, 8, [(3, 5)], [1, 2], magnitude, ctrl.YUV_INVERSES['exact'])
    np.testing.assert_allclose(tiled, np.tile(tiled[:8, :8], (4, 4, 1)), atol=1e-12)
    # U and V only: back in YUV (M Δ_rgb) the Y channel is untouched and U = V
    yuv = tiled @ ctrl.RGB_TO_YUV.T
    np.testing.assert_allclose(yuv[..., 0], 0, atol=1e-12)
    np.testing.assert_allclose(yuv[..., 1], yuv[..., 2], atol=1e-12)
    assert np.abs(yuv[..., 1]).max() > 1
    # --yuv_inverse kornia: the same YUV change mapped back with kornia 0.6.5's yuv_to_rgb matrix
    kornia = ctrl.ctrl_delta(32, 8, [(3, 5)], [1, 2], magnitude, ctrl.YUV_INVERSES['kornia'])
    np.testing.assert_allclose(kornia, yuv @ np.array([[1, 0, 1.14], [1, -0.396, -0.581], [1, 2.029, 0]]).T,
                               atol=1e-12)
    assert 1e-3 < np.abs(kornia - tiled).max() < 0.1


def ctrl_by_hand(image: np.ndarray, magnitude: float, frequencies, channels, window: int) -> np.ndarray:
    """CTRL's construction written out for one uint8 image (H, W, 3), unrounded: RGB -> YUV pixel by pixel,
    for each window the 2-D DCT as a sum against an explicitly built cosine basis, + magnitude, inverse sum,
    YUV -> RGB by solving M x = y."""
    m = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])  # kornia 0.6.5
    size = image.shape[0]
    yuv = np.einsum('ij,hwj->hwi', m, image.astype(np.float64))
    n = np.arange(window)
    scale = [math.sqrt((1 if k == 0 else 2) / window) for k in range(window)]
    cosine = np.array([[scale[k] * math.cos(math.pi * (2 * j + 1) * k / (2 * window)) for j in n] for k in n])
    basis = np.einsum('ur,vc->uvrc', cosine, cosine)  # basis[u, v] is the image of coefficient (u, v)
    for channel in channels:
        for top in range(0, size, window):
            for left in range(0, size, window):
                block = yuv[top:top + window, left:left + window, channel]
                coefficients = np.einsum('uvrc,rc->uv', basis, block)
                for u, v in frequencies:
                    coefficients[u, v] += magnitude
                yuv[top:top + window, left:left + window, channel] = np.einsum('uvrc,uv->rc', basis, coefficients)
    return np.linalg.solve(m, yuv.reshape(-1, 3).T).T.reshape(image.shape)


@pytest.mark.parametrize('flags, frequencies, channels, window', [
    ([], [(15, 15), (31, 31)], [1, 2], 32),  # CTRL's defaults
    (['--window', '16', '--frequencies', '3,5', '15,15', '--channels', '0', '2'], [(3, 5), (15, 15)], [0, 2], 16),
])
def test_ctrl_trigger_matches_an_independent_implementation(tmp_path, flags, frequencies, channels, window):
    out = tmp_path / 'ctrl.npz'
    make_trigger.main(['--kind', 'ctrl', '--magnitude', '100', '--out', str(out), *flags])
    trigger = load_trigger(out, image_size=32)
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images[:3] = images[:3] // 2 + 64  # mid-range images: almost nothing clips
    for triggered in both_paths(images, trigger):
        for image, ours in zip(images, triggered):
            reference = ctrl_by_hand(image, 100.0, frequencies, channels, window)
            inside = (reference >= 0) & (reference <= 255)
            assert inside.mean() > 0.9
            difference = np.abs(ours.astype(float) - np.rint(reference))
            assert difference[inside].max() <= 1, difference[inside].max()
            assert (ours[reference < 0] == 0).all() and (ours[reference > 255] == 255).all()
    assert not np.array_equal(triggered, images)


@pytest.mark.parametrize('flags, message', [
    (['--frequencies', '32,0'], 'outside a 32x32 window'),
    (['--window', '8'], '--frequencies 15,15: outside a 8x8 window'),
    (['--window', '12'], '--window 12: must be at least 1 and divide --image_size 32'),
    (['--window', '0'], '--window 0'),
    (['--channels', '3'], '--channels'),
    (['--frequencies', '1,1', '1,1'], 'lists 1,1 twice'),
    (['--frequencies', '1;1'], 'expected positions u,v'),
    (['--magnitude', '5000'], 'more than 255'),
    (['--magnitude', 'nan'], '--magnitude must be finite'),
])
def test_ctrl_bad_flags(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        make_trigger.main(['--kind', 'ctrl', '--out', str(tmp_path / 't.npz'), *flags])
    assert not list(tmp_path.iterdir())


@pytest.mark.process
def test_make_trigger_ctrl_and_blend_as_a_user(tmp_path):
    ctrl = run_script('trigger/make_trigger.py', '--kind', 'ctrl', '--out', str(tmp_path / 'ctrl.npz'))
    assert ctrl.returncode == 0, ctrl.stderr
    with np.load(tmp_path / 'ctrl.npz') as arrays:
        assert arrays['t'].dtype == np.float64 and arrays['tm'].dtype == np.int64 and (arrays['tm'] == 1).all()
        assert arrays['info'].tolist() == ['ctrl', 'magnitude=100', 'frequencies=15,15 31,31', 'channels=U,V',
                                           'window=32', 'yuv=kornia-0.6.5 rgb_to_yuv, exact inverse']
        assert 0 < np.abs(arrays['t']).max() < 30  # about 22 grey levels at most: hard to see
    bad = run_script('trigger/make_trigger.py', '--kind', 'ctrl', '--row', '3', '--out', str(tmp_path / 'b.npz'))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        'error: --row applies to --kind patch, not to --kind ctrl']
    assert not (tmp_path / 'b.npz').exists()
