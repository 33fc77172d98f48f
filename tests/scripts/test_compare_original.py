"""scripts/investigate/compare_original.py and original_harness.py, on a stand-in for the original checkout.

The original code cannot be part of this repository, so the checkout here is a small fake with the
original's module layout and function signatures (and, like the public original, without the modules
whose source is missing). It runs its networks as the original does: 3 student and 2 teacher passes
per distillation step, 2 network passes per layer and MI epoch.
"""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from conftest import run_script
from core.errors import UsageError
from scripts.investigate import compare_original

FAKE_ORIGINAL = {
    'models/__init__.py': '''
        import torch.nn as nn
        import torch.nn.functional as F
        from .clip_model import CLIP  # source missing in the public original: the harness stands in
        from .scheduler import weight_scheduler


        class Base(nn.Module):
            def __init__(self):
                super().__init__()
                self.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

            def forward(self, x):
                return self.f(x)


        class SimCLR(nn.Module):
            def __init__(self):
                super().__init__()
                self.f, self.g = Base(), nn.Linear(4, 4)

            def forward(self, x):
                feature = self.f(x)
                return F.normalize(feature, dim=-1), F.normalize(self.g(feature), dim=-1)
    ''',
    'models/scheduler.py': '''
        timed_calls = []


        class weight_scheduler:
            def __init__(self, base_opt, momentum_opt, EPOCHS=100):
                self.EPOCHS = EPOCHS

            def estimate_mi(self, model, train_loader, layers, device):
                import torch
                model(torch.rand(100, 3, 32, 32))  # the original's shape probe, once per layer
                model(torch.rand(100, 3, 32, 32))
                model(torch.rand(100, 3, 32, 32))
                model(torch.rand(100, 3, 32, 32))
                if self.EPOCHS:
                    timed_calls.append(self.EPOCHS)
                    assert len(timed_calls) > 1, 'loss is NaN'  # the first estimation fails, as the original's can
                for layer in layers:
                    for epoch in range(self.EPOCHS):
                        for _ in range(2):  # training pass, then test_mi
                            for x, _ in train_loader:
                                model(x.cuda())
                return {}
    ''',
    'datasets/__init__.py': '',
    'datasets/cifar10_dataset.py': '''
        import numpy as np
        import torch
        from .backdoor_dataset import Images

        classes = list(range(10))
        train_transform = test_transform_cifar10 = finetune_transform_cifar10 = None


        def get_pretraining_cifar10(data_dir, ratio):
            return Images(data_dir + 'train.npz', pairs=True), Images(data_dir + 'train.npz'), None
    ''',
    'datasets/backdoor_dataset.py': '''
        import numpy as np
        import torch
        from torch.utils.data import Dataset


        class Images(Dataset):
            def __init__(self, path, pairs=False):
                self.x = torch.from_numpy(np.load(path)['x']).permute(0, 3, 1, 2).float() / 255
                self.pairs = pairs

            def __len__(self):
                return len(self.x)

            def __getitem__(self, index):
                return (self.x[index], self.x[index]) if self.pairs else (self.x[index], 0)


        class BadEncoderDataset(Images):
            def __init__(self, numpy_file, trigger_file, reference_file, indices, class_type, transform=None,
                         bd_transform=None, ftt_transform=None):
                super().__init__(numpy_file)
                self.indices, self.reference = indices, np.load(reference_file)['x']
                assert np.load(trigger_file)['t'].shape == (1, 32, 32, 3)

            def __len__(self):
                return len(self.indices)

            def __getitem__(self, index):
                x = self.x[self.indices[index]]
                return x, [x], [x], [x]
    ''',
    'evaluation/__init__.py': 'from .nn_classifier import NeuralNet, create_torch_dataloader, net_train, net_test\n',
    'evaluation/nn_classifier.py': '''
        import torch
        import torch.nn as nn
        from torch.utils.data import DataLoader, TensorDataset


        def NeuralNet(input_size, hidden, classes):
            return nn.Linear(input_size, classes)


        def create_torch_dataloader(features, labels, batch_size):
            return DataLoader(TensorDataset(torch.Tensor(features), torch.Tensor(labels)), batch_size=batch_size)


        def net_train(net, loader, optimizer, epoch, criterion):
            for x, y in loader:
                optimizer.zero_grad()
                criterion(net(x.cuda()), y.long().cuda()).backward()
                optimizer.step()
            print('train', epoch)


        def net_test(net, loader, epoch, criterion, keyword):
            with torch.no_grad():
                for x, y in loader:
                    net(x.cuda())
            print(keyword, epoch)
    ''',
    'train_clean_encoder.py': '''
        def train(net, data_loader, train_optimizer, epoch, args):
            for im_1, im_2 in data_loader:
                loss = -(net(im_1.cuda())[1] * net(im_2.cuda())[1]).sum()
                train_optimizer.zero_grad()
                loss.backward()
                train_optimizer.step()
            print(optimizer.param_groups[0]['lr'], args.knn_t, args.batch_size, data_loader.batch_size)
    ''',
    'train_badencoder.py': '''
        import setproctitle  # not installed here: the harness stands in
        import torch
        torch.multiprocessing.set_sharing_strategy('file_system')  # as the original, at import
        setproctitle.setproctitle('Genius')


        def train(backdoored_encoder, clean_encoder, data_loader, train_optimizer, args):
            assert torch.multiprocessing.get_sharing_strategy() == 'file_system'
            for img_clean, backdoors, references, augmented in data_loader:
                clean_encoder(img_clean.cuda())
                clean_encoder(references[0].cuda())
                loss = sum(backdoored_encoder(x.cuda()).sum()
                           for x in (img_clean, backdoors[0], references[0], augmented[0]))
                train_optimizer.zero_grad()
                loss.backward()
                train_optimizer.step()
            print(epoch, args.lambda1)
    ''',
    'MIMIC.py': '''
        import pandas  # not installed here: the harness stands in


        def train(snet, tnet, data_loader, train_optimizer, epoch, args):
            import torch
            assert torch.multiprocessing.get_sharing_strategy() == 'file_descriptor'  # MIMIC.py never changes it
            for im_1, im_2 in data_loader:
                im_1, im_2 = im_1.cuda(non_blocking=True, device=args.device), im_2.cuda(non_blocking=True)
                loss = snet(im_1)[0].sum() + snet(im_2)[0].sum() + snet.f(im_1).sum()
                loss = loss - (tnet(im_1)[0] * tnet.f(im_1)).sum()  # gradients reach the teacher, as the original
                train_optimizer.zero_grad()
                loss.backward()
                train_optimizer.step()
            print(optimizer.param_groups[0]['lr'], args.opt1 + args.opt5, epoch)
    ''',
}

TINY = ('--quick', '--device', 'cpu', '--num_workers', '0', '--batch_size', '8', '--badencoder_batch_size', '8',
        '--mimic_batch_size', '4', '--mi_batch_size', '8', '--mi_images', '16', '--mi_epochs', '4',
        '--mi_measure_epochs', '2', '--probe_features', '64', '--probe_test_features', '32', '--probe_epochs', '6',
        '--knn_bank', '64', '--knn_queries', '16', '--steps', '1', '--no_progress')


@pytest.fixture
def fake_original(tmp_path):
    root = tmp_path / 'original'
    for name, text in FAKE_ORIGINAL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.mark.process
def test_comparison_times_both_sides_and_prints_one_json_line(fake_original):
    result = run_script('-m', 'scripts.investigate.compare_original', '--original', str(fake_original), *TINY, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    ours, original = report['ours'], report['original']
    for key in compare_original.benchmark.FIGURES:
        for side in (ours, original):
            assert math.isfinite(side[key]) and side[key] > 0, key
    # the original's way of running its networks, counted by the harness
    assert original['mimic_student_forwards_per_step'] == 3 and original['mimic_teacher_forwards_per_step'] == 2
    assert original['mimic_teacher_gets_gradients'] is True
    assert original['badencoder_encoder_forwards_per_step'] == 4
    assert original['badencoder_clean_encoder_forwards_per_step'] == 2
    assert original['simclr_forwards_per_step'] == 2
    assert original['mi_network_passes_per_image'] == 2 * 4 * 4  # 2 passes x 4 layers x 4 epochs (2 measured)
    assert original['extrapolated'] == ['mi_estimation_s', 'downstream_s']
    # the one-off set-up counted once, the 2 measured epochs scaled to 4 (the set-up is timed in a run of its own,
    # whose first-call costs can make it the longer one at this tiny scale: no order between the two is asserted)
    setup, measured = original['mi_setup_s'], original['mi_measured_s']
    assert setup > 0 and measured > 0
    assert math.isclose(original['mi_estimation_s'], setup + 2 * (measured - setup))
    assert original['num_workers'] == ours['num_workers'] == 0
    assert original['mi_nan_failures'] == 1 and 'stopped on a NaN loss' in result.stderr
    assert set(original['stand_ins']) >= {'models.clip_model', 'setproctitle', 'pandas'}
    assert original['checkout'] == str(fake_original.resolve()) and original['threads'] == 1
    for key, ratio in report['speedup'].items():
        expected = ours[key] / original[key] if key.endswith('_per_s') else original[key] / ours[key]
        assert math.isclose(ratio, expected), key
    assert '| `mimic_img_per_s` |' in result.stderr
    assert 'ours: augmentation pil, amp False, compile False; the original: PIL augmentation' in result.stderr


@pytest.mark.process  # the harness runs in a process of its own
def test_probe_left_out_without_nn_classifier(fake_original, tmp_path, capfd):
    """The public original lacks evaluation/nn_classifier.py: the other figures are still compared. The original's
    side runs as the script runs it (the harness in its own process); ours is stood in by hand-made figures, since
    timing it (the test above) shows nothing more here."""
    (fake_original / 'evaluation' / 'nn_classifier.py').unlink()
    (fake_original / 'evaluation' / '__init__.py').write_text('from .nn_classifier import NeuralNet\n')
    args = compare_original.get_args_parser().parse_args(['--original', str(fake_original), *TINY])
    compare_original.benchmark.resolve_counts(args)
    files = compare_original.write_original_layout(tmp_path, *compare_original.benchmark.image_pool(args))
    original = compare_original.time_original(args, torch.device('cpu'), files)
    assert 'downstream_s' not in original and original['mimic_img_per_s'] > 0
    assert 'evaluation/nn_classifier.py is not in the checkout' in capfd.readouterr().err
    ours = {key: 2.0 for key in compare_original.COMPARED}
    ours.update(augment='pil', amp=False, compile=False, device_name='cpu', threads=1, num_workers=0)
    ratios = compare_original.speedups(ours, original)
    assert 'downstream_s' not in ratios and ratios['mimic_img_per_s'] == 2.0 / original['mimic_img_per_s']
    assert '| `downstream_s` | not measured | 2 | |' in compare_original.table(ours, original, ratios)


def test_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(UsageError, match='not a checkout of the original MIMIC code'):
        compare_original.main(['--original', str(tmp_path), *TINY])


def test_other_widths_cannot_be_compared(fake_original):
    with pytest.raises(UsageError, match='only resnet18 at width 64'):
        compare_original.main(['--original', str(fake_original), *TINY, '--width', '8'])


@pytest.mark.process  # the script as a user runs it: the exit status and the last line are what is tested
def test_failing_original_is_refused_after_its_own_messages(fake_original):
    (fake_original / 'MIMIC.py').write_text('raise ImportError("broken checkout")\n')
    result = run_script('-m', 'scripts.investigate.compare_original', '--original', str(fake_original), *TINY, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith('error: the original implementation failed')
    assert 'broken checkout' in result.stderr  # the child's own traceback, above the one-line error
