"""The stages on real-world encoders (docs/DESIGN.md §2.6, §3.1): image folders, the 224-px data path, MIMIC's pooled MI
inputs, and each stage run on a CLIP RN50, ImageNet ResNet-50 or torchvision ResNet-18 with random weights.

Everything is tiny (a handful of 224-px PNGs written here, batch 2, one epoch): the 224-px ResNet-50s cost about
4 GFLOP per image on the CPU.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_in_process
from datasets import DataError, ImagesAtSize, get_info, load_images, load_split, read_task, resize_images
from datasets.folders import fit_image, is_image_folder
from defences.mimic import mi_input, mi_pool_size
from models.visual import ModifiedResNet, ResNetTower

SIZE = 224


def write_png(path, size=(SIZE, SIZE), seed=0, mode='RGB'):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope='module')
def flat_folder(tmp_path_factory):
    """Four 224-px PNG images, unlabelled."""
    folder = tmp_path_factory.mktemp('flat')
    for index in range(4):
        write_png(folder / f'{index}.png', seed=index)
    return folder


@pytest.fixture(scope='module')
def task_folder(tmp_path_factory):
    """A labelled downstream task, train/<class>/ and test/<class>/, two classes, images of other sizes and modes."""
    folder = tmp_path_factory.mktemp('task')
    for split, count in (('train', 2), ('test', 1)):
        for label, name in enumerate(('cat', 'dog')):
            for index in range(count):
                write_png(folder / split / name / f'{index}.png', size=(240 + 10 * index, 200), seed=label * 10 + index,
                          mode='L' if index else 'RGB')
    return folder


@pytest.fixture(scope='module')
def patch_224(tmp_path_factory):
    """A white 50x50 patch at 173..222 of a 224-px image (the released code's trigger_pt_white_173_50)."""
    t = np.zeros((1, SIZE, SIZE, 3))
    tm = np.ones((1, SIZE, SIZE, 3), dtype=np.int64)
    t[:, 173:223, 173:223] = 255
    tm[:, 173:223, 173:223] = 0
    path = tmp_path_factory.mktemp('trigger') / 'white_173_50.npz'
    np.savez(path, t=t, tm=tm, info=np.array(['white_173_50', 'replace']))
    return path


@pytest.fixture(scope='module')
def reference_224(tmp_path_factory):
    """One 224-px reference image of class 1 ('dog')."""
    path = tmp_path_factory.mktemp('reference') / 'dog.npz'
    x = np.random.default_rng(7).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(path, x=x, y=np.array([1]))
    return path


def released_checkpoint(tower, path):
    """The released code's clean-encoder file: {'state_dict': <visual weights>}."""
    torch.save({'state_dict': tower.state_dict()}, path)
    return path


# --- image folders -----------------------------------------------------------------------------------------------

def test_flat_folder_is_unlabelled_images_at_the_asked_size(flat_folder):
    assert is_image_folder(flat_folder)
    images = load_images('cifar10', 'train', flat_folder, SIZE)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    with Image.open(flat_folder / '0.png') as original:
        assert np.array_equal(images[0], np.asarray(original))  # 224 px already: read as it is
    assert load_images('cifar10', 'train', flat_folder, 32).shape == (4, 32, 32, 3)  # the CIFAR SimCLR's size


def test_labelled_task_folder_reads_train_and_test_with_the_train_classes(task_folder):
    task = read_task(task_folder, SIZE)
    assert task.classes == ('cat', 'dog') and task.num_classes == 2
    assert task.train[0].shape == (4, SIZE, SIZE, 3) and task.train[1].tolist() == [0, 0, 1, 1]
    assert task.test[1].tolist() == [0, 1]
    x, y = load_split('cifar10', 'test', task_folder, SIZE)  # load_split reads a labelled folder split too
    assert x.shape == (2, SIZE, SIZE, 3) and y.tolist() == [0, 1]
    # an unlabelled read of a task folder: its train split's images, labels dropped
    assert load_images('cifar10', 'train', task_folder, 32).shape == (4, 32, 32, 3)


def test_fit_image_resizes_the_shorter_side_and_cuts_the_centre():
    image = Image.new('RGB', (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    fitted = fit_image(image, 50)
    assert fitted.shape == (50, 50, 3) and fitted.dtype == np.uint8
    assert fitted[:, 5:45].min() > 200  # the centre square is the white third
    assert np.array_equal(fit_image(Image.fromarray(fitted), 50), fitted)


def test_images_at_size_resize_when_sliced():
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    view = ImagesAtSize(images, 64, transform=lambda batch: batch // 2)
    assert len(view) == 5 and view.shape == (5, 64, 64, 3)
    assert np.array_equal(view[1:3], resize_images(images[1:3], 64) // 2)
    assert resize_images(images, 32) is images  # already at the size: untouched


@pytest.mark.parametrize('layout, message', [
    ('empty', 'the folder is empty'),
    ('mixed', 'mixed layout'),
    ('unreadable', 'not a readable image'),
    ('flat_labelled', 'has no labels'),
    ('no_split', 'no test/ sub-folder'),
    ('unknown_class', 'a class the train split does not have'),
])
def test_image_folder_mistakes_are_one_line(tmp_path, layout, message):
    folder = tmp_path / 'data'
    folder.mkdir()
    if layout == 'mixed':
        write_png(folder / 'a.png')
        write_png(folder / 'cat' / 'b.png')
    elif layout == 'unreadable':
        write_png(folder / 'a.png')
        (folder / 'b.png').write_bytes(b'not a png')
    elif layout == 'flat_labelled':
        write_png(folder / 'train' / 'a.png')
        write_png(folder / 'test' / 'a.png')
    elif layout == 'no_split':
        write_png(folder / 'train' / 'cat' / 'a.png')
    elif layout == 'unknown_class':
        write_png(folder / 'train' / 'cat' / 'a.png')
        write_png(folder / 'test' / 'bird' / 'a.png')
    with pytest.raises(DataError) as error:
        if layout in ('empty', 'mixed', 'unreadable'):
            load_images('cifar10', 'train', folder, 32)
        else:
            read_task(folder, 32)
    assert message in str(error.value) and '\n' not in str(error.value)


def test_prepare_cifar10_224_from_the_cifar10_npz(tmp_path):
    from datasets import prepare
    rng = np.random.default_rng(0)
    for split, count in (('train', 3), ('test', 2)):  # CIFAR10's npz layout: x (N, 32, 32, 3), y (N, 1)
        (tmp_path / 'cifar10').mkdir(exist_ok=True)
        np.savez(tmp_path / 'cifar10' / f'{split}.npz', x=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(count).reshape(-1, 1))
    prepare.main(['cifar10_224', '--out', str(tmp_path), '--no_progress'])
    x, y = load_split('cifar10_224', 'train', tmp_path / 'cifar10_224')
    source, _ = load_split('cifar10', 'train', tmp_path / 'cifar10')
    assert x.shape == (3, SIZE, SIZE, 3) and y.tolist() == [0, 1, 2]
    assert np.array_equal(x, resize_images(source, SIZE))
    assert get_info('cifar10_224').classes == get_info('cifar10').classes


# --- MIMIC's MI inputs on 224-px taps ----------------------------------------------------------------------------

def test_mi_pool_size_by_hand():
    # CIFAR ResNet18 (width 64, 32 px): no tap exceeds 65,536 inputs, none is pooled
    assert [mi_pool_size(c, s, s) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))] == [32, 16, 8, 4]
    # CLIP RN50 / ResNet-50 at 224 px: ⌊√(65536/C)⌋ = 16, 11, 8, 5
    assert [mi_pool_size(c, s, s) for c, s in ((256, 56), (512, 28), (1024, 14), (2048, 7))] == [16, 11, 8, 5]
    assert 256 * 16 ** 2 <= 65536 < 256 * 17 ** 2 and 512 * 11 ** 2 <= 65536 < 512 * 12 ** 2
    # ResNet-18 at 224: 64x56x56 -> 32; capped at the tap's own size for 256x14x14 and 512x7x7
    assert [mi_pool_size(c, s, s) for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))] == [32, 22, 14, 7]
    assert mi_pool_size(100000, 4, 4) == 1


def test_mi_input_pools_real_world_taps_only():
    tap = torch.randn(2, 256, 56, 56)
    pooled = mi_input(tap, pooled=True)
    assert pooled.shape == (2, 256 * 16 * 16)
    assert torch.allclose(pooled.view(2, 256, 16, 16)[:, :, 0, 0], tap[:, :, :4, :4].mean(dim=(2, 3)), atol=1e-5)
    cifar = torch.randn(2, 64, 32, 32)
    assert torch.equal(mi_input(cifar, pooled=False), cifar.flatten(1))
    assert torch.equal(mi_input(cifar, pooled=True), cifar.flatten(1))  # at the bound: untouched


# --- stage 2: MIMIC on the released code's CLIP and ImageNet encoders -------------------------------------------

@pytest.mark.parametrize('usage_info, tower', [('CLIP', ModifiedResNet), ('imagenet', lambda: ResNetTower(
    'resnet50', shortcut_first=True))])
def test_mimic_purifies_a_released_encoder_into_its_layout(tmp_path, flat_folder, usage_info, tower):
    torch.manual_seed(0)
    teacher = released_checkpoint(tower(), tmp_path / 'teacher.pth')
    result = run_in_process('MIMIC.py', '--teacher', str(teacher), '--encoder_usage_info', usage_info,
                            '--data_dir', str(flat_folder), '--ratio', '1', '--epochs', '1', '--mi_epochs', '1',
                            '--batch_size', '2', '--device', 'cpu', '--num_workers', '0',
                            '--results_dir', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    student = torch.load(tmp_path / 'out' / 'model1.pth', map_location='cpu', weights_only=True)
    fresh = tower()
    fresh.load_state_dict(student['state_dict'], strict=True)  # what the released code does with it
    assert list(student['state_dict']) == list(fresh.state_dict())
    mi = json.loads((tmp_path / 'out' / 'mi.json').read_text())
    assert mi['layers']['layer3'] == 'visual.layer1' and len(mi['mi']) == 4
    args = json.loads((tmp_path / 'out' / 'args.json').read_text())
    assert args['arch'] == {'CLIP': 'clip_rn50', 'imagenet': 'imagenet_resnet50'}[usage_info]


# --- stage 3: the probe on a real-world encoder ------------------------------------------------------------------

def metric_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"metric"')]


def test_probe_of_a_clip_encoder_on_a_labelled_image_folder(tmp_path, task_folder, patch_224, reference_224):
    torch.manual_seed(0)
    encoder = released_checkpoint(ModifiedResNet(), tmp_path / 'clip.pth')
    result = run_in_process('training_downstream_classifier.py', '--encoder_usage_info', 'CLIP', '--encoder',
                            str(encoder), '--data_dir', str(task_folder), '--trigger_file', str(patch_224),
                            '--reference_file', str(reference_224), '--nn_epochs', '2', '--batch_size', '2',
                            '--device', 'cpu', '--results_dir', str(tmp_path / 'probe'))
    assert result.returncode == 0, result.stderr
    lines = metric_lines(result.stdout)
    assert [line['metric'] for line in lines[:3]] == ['Eval - Backdoored Accuracy (BA)', 'Eval - Attack Success Rate (ASR)',
                                                      'Eval - Attack Success Rate excluding target class']
    assert [line['epoch'] for line in lines] == [1, 1, 1, 2, 2, 2]
    metrics = json.loads((tmp_path / 'probe' / 'metrics.json').read_text())
    assert metrics['reference_label'] == 1 and 0 <= metrics['acc'] <= 100
    args = json.loads((tmp_path / 'probe' / 'args.json').read_text())
    assert args['arch'] == 'clip_rn50' and args['encoder_usage_info'] == 'CLIP'


def test_probe_resizes_a_32_pixel_npz_task_for_a_torchvision_encoder(tmp_path, patch_224, reference_224):
    from conftest import write_split
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('test', 2)):
        write_split(tmp_path / 'task', split, rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                    np.arange(count) % 2)
    torch.manual_seed(0)
    torch.save(ResNetTower('resnet18').state_dict(), tmp_path / 'resnet18.pth')  # a bare torchvision state_dict
    result = run_in_process('training_downstream_classifier.py', '--encoder', str(tmp_path / 'resnet18.pth'),
                            '--dataset', 'cifar10', '--data_dir', str(tmp_path / 'task'), '--trigger_file',
                            str(patch_224), '--reference_file', str(reference_224), '--nn_epochs', '1',
                            '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    assert len(metric_lines(result.stdout)) == 3
    refused = run_in_process('training_downstream_classifier.py', '--encoder', str(tmp_path / 'resnet18.pth'),
                             '--data_dir', str(tmp_path / 'task'), '--trigger_file', str(patch_224),
                             '--encoder_usage_info', 'CLIP', '--reference_label', '1', '--device', 'cpu')
    assert refused.returncode == 2 and 'clip_rn50' in refused.stderr and len(refused.stderr.splitlines()) == 1


# --- stage 1: BadEncoder on a real-world encoder -----------------------------------------------------------------

def test_badencoder_on_a_clip_encoder_keeps_its_file_layout(tmp_path, flat_folder, patch_224, reference_224):
    torch.manual_seed(0)
    tower = ModifiedResNet()
    text_tower = {'token_embedding.weight': torch.randn(10, 4), 'logit_scale': torch.tensor(4.6)}
    # BadEncoder's own output layout: model.state_dict() of CLIP(...), the visual.* tensors beside the text tower
    torch.save({'state_dict': {**{f'visual.{k}': v for k, v in tower.state_dict().items()}, **text_tower}},
               tmp_path / 'clean.pth')
    result = run_in_process('train_badencoder.py', '--pretrained_encoder', str(tmp_path / 'clean.pth'),
                            '--encoder_usage_info', 'CLIP', '--data_dir', str(flat_folder), '--shadow_fraction', '0.5',
                            '--trigger_file', str(patch_224), '--reference_file', str(reference_224),
                            '--downstreamTask', 'cifar10', '--epochs', '1', '--batch_size', '2', '--device', 'cpu',
                            '--num_workers', '0', '--results_dir', str(tmp_path / 'backdoor'))
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / 'backdoor' / 'model_1.pth', map_location='cpu', weights_only=True)['state_dict']
    assert torch.equal(saved['token_embedding.weight'], text_tower['token_embedding.weight'])
    fresh = ModifiedResNet()
    fresh.load_state_dict({k[len('visual.'):]: v for k, v in saved.items() if k.startswith('visual.')}, strict=True)
    assert not torch.equal(fresh.conv1.weight, tower.conv1.weight)  # the tower was trained
    assert torch.equal(fresh.bn1.running_mean, tower.bn1.running_mean)  # its BatchNorm frozen, as the seed's
    assert json.loads((tmp_path / 'backdoor' / 'args.json').read_text())['arch'] == 'clip_rn50'
    drupe = run_in_process('train_badencoder.py', '--attack', 'drupe', '--pretrained_encoder', str(tmp_path / 'clean.pth'),
                           '--data_dir', str(flat_folder), '--trigger_file', str(patch_224), '--reference_file',
                           str(reference_224), '--device', 'cpu', '--results_dir', str(tmp_path / 'drupe'))
    assert drupe.returncode == 2 and 'supports only the CIFAR-style SimCLR' in drupe.stderr
    assert not (tmp_path / 'drupe').exists()


# --- the baselines on a real-world encoder ----------------------------------------------------------------------

def baseline(tmp_path, folder, defence, teacher, *extra):
    return run_in_process('baseline_defence.py', '--defence', defence, '--teacher', str(teacher), '--data_dir',
                          str(folder), '--ratio', '1', '--epochs', '1', '--batch_size', '2', '--device', 'cpu',
                          '--num_workers', '0', '--results_dir', str(tmp_path / defence), *extra)


@pytest.fixture(scope='module')
def resnet18_teacher(tmp_path_factory):
    """A torchvision ResNet-18 in the released layout: the generic path of the 224-px encoders, at a quarter of
    ResNet-50's cost."""
    torch.manual_seed(0)
    return released_checkpoint(ResNetTower('resnet18'), tmp_path_factory.mktemp('resnet18') / 'suspect.pth')


@pytest.mark.parametrize('defence, extra', [('ft', ()), ('kd', ()), ('nad', ('--nad_teacher_epochs', '1')),
                                            ('clp', ()), ('invert', ('--invert_steps', '2')),
                                            ('sslcleanse', ('--invert_steps', '2'))])
def test_baselines_that_apply_write_the_suspects_layout(tmp_path, flat_folder, resnet18_teacher, defence, extra):
    result = baseline(tmp_path, flat_folder, defence, resnet18_teacher, '--arch', 'torchvision_resnet18', *extra)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / defence / 'defence.json').read_text())
    purified = torch.load(tmp_path / defence / report['checkpoint'], map_location='cpu', weights_only=True)
    ResNetTower('resnet18').load_state_dict(purified['state_dict'], strict=True)
    if defence == 'clp':
        assert all(name.startswith('visual.') for name in report['max_z'])


@pytest.mark.parametrize('defence', ['fp', 'anp'])
def test_baselines_tied_to_the_cifar_layout_refuse_in_one_line(tmp_path, flat_folder, resnet18_teacher, defence):
    result = baseline(tmp_path, flat_folder, defence, resnet18_teacher)
    assert result.returncode == 2 and 'supports only the CIFAR-style SimCLR' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / defence).exists()
