"""trigger/make_trigger.py, the committed paper trigger, and reference/make_reference.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import COMPAT, REPO, requires_compat, run_script
from core.errors import UsageError
from datasets import DataError, apply_trigger, load_reference, load_split, load_trigger
from reference import make_reference
from trigger import make_trigger

PAPER_TRIGGER = 'trigger_pt_white_21_10_ap_replace.npz'


def load(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def assert_same_npz(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


# ------------------------------------------------------------------------------------------ trigger

@requires_compat('trigger', PAPER_TRIGGER)
def test_committed_trigger_equals_the_papers():
    assert_same_npz(load(REPO / 'trigger' / PAPER_TRIGGER), load(COMPAT / 'trigger' / PAPER_TRIGGER))


def original_apply_numpy(x, t, tm):
    """The formula before fractional and signed triggers (and the original code's): x * tm + t cast to uint8."""
    return (x * tm + t).astype(np.uint8)


def original_apply_torch(x, t, tm):
    return (x.float() * torch.as_tensor(tm, dtype=torch.float32) + torch.as_tensor(t, dtype=torch.float32)
            ).to(torch.uint8)


@pytest.mark.parametrize('folder', [REPO / 'trigger',
                                    pytest.param(COMPAT / 'trigger', marks=requires_compat('trigger', PAPER_TRIGGER))])
def test_paper_trigger_applies_bit_for_bit_as_before(folder):
    """clip(round(x * tm + t)) equals the original x * tm + t for the paper's patch, on numpy and torch: every
    value 0..255 at every pixel, then random images."""
    raw = load(folder / PAPER_TRIGGER)
    t, tm = raw['t'][0], raw['tm'][0]
    trigger = load_trigger(folder / PAPER_TRIGGER, image_size=32)
    every_value = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 32, 32, 3))
    random = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    for x in (np.ascontiguousarray(every_value), random):
        expected = original_apply_numpy(x, t, tm)
        ours = apply_trigger(x, trigger)
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, expected)
        ours_torch = apply_trigger(torch.from_numpy(x), trigger)
        assert ours_torch.dtype == torch.uint8
        np.testing.assert_array_equal(ours_torch.numpy(), original_apply_torch(torch.from_numpy(x), t, tm).numpy())
        np.testing.assert_array_equal(ours_torch.numpy(), expected)
    assert (expected[:, 21:31, 21:31] == 255).all() and not np.array_equal(expected, random)


@pytest.mark.process
def test_make_trigger_as_a_user_regenerates_the_committed_file(tmp_path):
    out = tmp_path / PAPER_TRIGGER
    result = run_script('trigger/make_trigger.py', '--out', str(out))
    assert result.returncode == 0, result.stderr
    assert_same_npz(load(out), load(REPO / 'trigger' / PAPER_TRIGGER))
    arrays = load(out)
    assert arrays['t'].dtype == np.float64 and arrays['tm'].dtype == np.int64
    assert arrays['info'].tolist() == ['white_21_10', 'replace']

    image = np.full((2, 32, 32, 3), 7, dtype=np.uint8)
    triggered = apply_trigger(image, load_trigger(out, image_size=32))
    assert (triggered[:, 21:31, 21:31] == 255).all()
    assert (triggered[:, :21] == 7).all() and (triggered[:, :, :21] == 7).all()
    assert triggered[:, 31].max() == 7 and triggered[:, :, 31].max() == 7

    before = out.read_bytes()
    again = run_script('trigger/make_trigger.py', '--out', str(out), '--size', '3')
    assert again.returncode == 2 and '--force' in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_make_trigger_custom_colour_position_and_force(tmp_path):
    out = tmp_path / 'red.npz'
    out.write_bytes(b'old')
    make_trigger.main(['--out', str(out), '--image_size', '16', '--row', '0', '--col', '12', '--size', '4',
                       '--colour', '255,0,10', '--force'])
    trigger = load_trigger(out, image_size=16)
    assert trigger.patch.shape == trigger.mask.shape == (1, 16, 16, 3)
    inside = np.zeros((16, 16), dtype=bool)
    inside[0:4, 12:16] = True
    np.testing.assert_array_equal(trigger.mask[0, ..., 0], (~inside).astype(np.int64))
    np.testing.assert_array_equal(trigger.patch[0][inside], np.tile([255., 0., 10.], (16, 1)))
    assert (trigger.patch[0][~inside] == 0).all()
    assert trigger.info == ('255-0-10_0-12_4', 'replace')


@pytest.mark.parametrize('flags, message', [(['--row', '25'], 'does not fit'), (['--col', '-1'], 'does not fit'),
                                            (['--size', '0'], 'at least 1'), (['--colour', '1,2'], '--colour')])
def test_make_trigger_bad_flags(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        make_trigger.main(['--out', str(tmp_path / 't.npz'), *flags])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ reference

@pytest.mark.process
def test_make_reference_as_a_user(tmp_path, data_root):
    out = tmp_path / 'synthetic_shapes' / 'one.npz'
    result = run_script('reference/make_reference.py', '--dataset', 'synthetic_digits', '--class_id', '1',
                        '--first', '2', '--out', str(out), '--data_root', str(data_root))
    assert result.returncode == 0, result.stderr
    x, y = load_split('synthetic_digits', 'train', data_root / 'synthetic_digits')
    reference = load_reference(out, num_classes=10, image_size=32)
    np.testing.assert_array_equal(reference.x, x[y == 1][:2])
    assert reference.y.dtype == np.int64 and reference.y.tolist() == [1, 1] and reference.target_label == 1
    assert reference.info[0] == 'synthetic_digits/train' and 'indices within class: 0,1' in reference.info

    bad = run_script('reference/make_reference.py', '--dataset', 'synthetic_digits', '--class_id', '10',
                     '--out', str(tmp_path / 'bad.npz'), '--data_root', str(data_root))
    assert bad.returncode == 2 and bad.stderr.startswith('error: --class_id 10')
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'bad.npz').exists()


def test_make_reference_indices_label_and_split(tmp_path, data_root):
    out = tmp_path / 'ref.npz'
    make_reference.main(['--dataset', 'synthetic_digits', '--split', 'test', '--class_id', '7',
                         '--indices', '3,0', '--label', '2', '--out', str(out), '--data_root', str(data_root)])
    x, y = load_split('synthetic_digits', 'test', data_root / 'synthetic_digits')
    reference = load_reference(out)
    np.testing.assert_array_equal(reference.x, x[y == 7][[3, 0]])
    assert reference.y.tolist() == [2, 2]
    split_indices = np.flatnonzero(y == 7)[[3, 0]]
    assert f"indices within split: {','.join(map(str, split_indices))}" in reference.info

    with pytest.raises(UsageError, match='already exists'):
        make_reference.main(['--dataset', 'synthetic_digits', '--class_id', '1', '--out', str(out),
                             '--data_root', str(data_root)])


def test_make_reference_from_an_image_folder_at_the_encoders_size(tmp_path, data_root):
    from PIL import Image
    for name, value in (('airplane', 10), ('truck', 200)):  # FOLDER/train/<class>/*: the classes sorted
        (tmp_path / 'task' / 'train' / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((40, 60, 3), value + k, np.uint8)).save(tmp_path / 'task' / 'train' / name / f'{k}.png')
    out = tmp_path / 'truck.npz'
    make_reference.main(['--dataset', 'stl10', '--data_dir', str(tmp_path / 'task'), '--class_id', '1',
                         '--indices', '1', '--image_size', '24', '--out', str(out)])
    reference = load_reference(out, image_size=24)
    assert reference.x.shape == (1, 24, 24, 3) and (reference.x == 201).all()  # a uniform image stays uniform
    assert reference.y.tolist() == [1] and 'class 1 (truck)' in reference.info
    with pytest.raises(UsageError, match=r'has classes 0..1 \(airplane, truck\)'):
        make_reference.main(['--dataset', 'stl10', '--data_dir', str(tmp_path / 'task'), '--class_id', '2',
                             '--out', str(tmp_path / 'bad.npz')])
    # an npz at 32 px: the chosen image resized, not the split
    make_reference.main(['--dataset', 'synthetic_digits', '--class_id', '1', '--image_size', '64',
                         '--out', str(tmp_path / 'one.npz'), '--data_root', str(data_root)])
    assert load_reference(tmp_path / 'one.npz', image_size=64).x.shape == (1, 64, 64, 3)


@pytest.mark.parametrize('flags, error, message', [
    (['--class_id', '-1'], UsageError, 'has classes 0..9'),
    (['--class_id', '1', '--indices', '0,999'], UsageError, 'index 999 is out of range'),
    (['--class_id', '1', '--indices', '1,x'], UsageError, 'non-negative integers'),
    (['--class_id', '1', '--first', '0'], UsageError, '--first 0'),
    (['--class_id', '1', '--split', 'validation'], DataError, "no split 'validation'"),
])
def test_make_reference_bad_flags(tmp_path, data_root, flags, error, message):
    with pytest.raises(error, match=message):
        make_reference.main(['--dataset', 'synthetic_digits', '--out', str(tmp_path / 'r.npz'),
                             '--data_root', str(data_root), *flags])
    assert not list(tmp_path.iterdir())


@requires_compat('reference')
def test_papers_reference_files_load_unchanged():
    labels = {'priority.npz': (12, 43), 'truck.npz': (9, 10), 'one.npz': (1, 10), 'airplane.npz': (0, 10)}
    paths = sorted((COMPAT / 'reference').glob('*/*.npz'))
    assert paths
    for path in paths:
        target, num_classes = labels[path.name]
        raw = load(path)
        reference = load_reference(path, num_classes=num_classes, image_size=32)
        np.testing.assert_array_equal(reference.x, raw['x'])
        assert reference.x.dtype == np.uint8 and reference.target_label == target


def test_load_reference_resized_to_a_real_world_encoders_input(tmp_path):
    """resize_to: a 32-px reference becomes the encoder's 224 px (a plain colour stays that colour); without it the
    size is checked against image_size."""
    path = tmp_path / 'ref.npz'
    np.savez(path, x=np.full((2, 32, 32, 3), (10, 200, 30), dtype=np.uint8), y=np.array([3, 3]))
    reference = load_reference(path, num_classes=10, image_size=32, resize_to=224)
    assert reference.x.shape == (2, 224, 224, 3) and reference.x.dtype == np.uint8
    assert (reference.x == np.array([10, 200, 30], dtype=np.uint8)).all()
    assert reference.y.tolist() == [3, 3]
    with pytest.raises(DataError, match='224'):
        load_reference(path, num_classes=10, image_size=224)
