"""On the CPU every encoder gets contiguous NCHW input, never channels-last.

A channels-last input makes oneDNN take its NHWC kernels, whose 1x1 stride-2 backward-weights pass writes past
its workspace when the input has fewer channels than the kernel's block (docs/ONEDNN_NHWC_CRASH.md): a crash, a
hang or wrong weight gradients. The layout checks below fail without the fix on any machine; the subprocess test
crashes without it only where the CPU runs the faulty kernels (AVX-512 with two threads, for one).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import baseline_defence
import MIMIC
import train_badencoder
import train_clean_encoder
import training_downstream_classifier
from datasets import normalize_batch
from datasets.fastpath import DevicePairBatches, DeviceShadowBatches
from datasets.tensor_augment import finetune_views, model_layout, simclr_views, to_float
from defences import BASELINES
from conftest import REPO

NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def uint8_images(n=6, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ the batch makers

def test_to_float_is_contiguous_nchw_with_the_same_values():
    images = uint8_images()
    x = to_float(images)
    assert x.shape == (6, 3, 32, 32) and x.is_contiguous()
    assert torch.equal(x, images.permute(0, 3, 1, 2).float() / 255)


def test_model_layout_makes_a_channels_last_tensor_contiguous_on_the_cpu():
    channels_last = torch.randn(2, 32, 32, 3).permute(0, 3, 1, 2)
    assert not channels_last.is_contiguous()
    out = model_layout(channels_last)
    assert out.is_contiguous() and torch.equal(out, channels_last)


@pytest.mark.parametrize('make', [
    lambda x: normalize_batch(x, NORMALIZATION),
    lambda x: normalize_batch(x.numpy(), NORMALIZATION, torch.device('cpu')),
    lambda x: simclr_views(x, NORMALIZATION, torch.Generator().manual_seed(0)),
    lambda x: finetune_views(x, NORMALIZATION, torch.Generator().manual_seed(0)),
], ids=['normalize_batch', 'normalize_batch_numpy', 'simclr_views', 'finetune_views'])
def test_every_batch_maker_gives_contiguous_nchw(make):
    x = make(uint8_images())
    assert x.shape == (6, 3, 32, 32) and x.is_contiguous()


def test_device_batches_are_contiguous():
    images = uint8_images(8)
    view_1, view_2 = next(iter(DevicePairBatches(images, NORMALIZATION, 4, seed=0, epoch=1)))
    assert view_1.is_contiguous() and view_2.is_contiguous()
    _, views = next(iter(DeviceShadowBatches(8, images[:2], NORMALIZATION, 4, seed=0, epoch=1)))
    assert views.shape == (4, 2, 3, 32, 32) and views.is_contiguous()


# ------------------------------------------------------------------------ every stage, as the encoder sees it

@pytest.fixture
def conv_inputs():
    """The memory layouts of every Conv2d input while the test runs: (contiguous, channels_last) per call."""
    seen = []

    def record(module, inputs):
        if isinstance(module, torch.nn.Conv2d) and inputs[0].device.type == 'cpu':
            x = inputs[0]
            seen.append((x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield seen
    handle.remove()


def assert_all_contiguous(seen):
    assert seen, 'no convolution ran'
    bad = [layout for layout in seen if not layout[0]]
    assert not bad, f'{len(bad)} of {len(seen)} convolution inputs were not contiguous NCHW'


def common_flags(data_root, out):
    return ['--data_root', str(data_root), '--device', 'cpu', '--num_workers', '0', '--no_progress',
            '--results_dir', str(out)]


@pytest.mark.parametrize('augment', ['tensor', 'pil'])
def test_stage0_feeds_contiguous_batches(conv_inputs, data_root, tmp_path, augment):
    train_clean_encoder.main(['--pretraining_dataset', 'synthetic_shapes', '--width', '8', '--batch_size', '64',
                              '--epochs', '1', '--augment', augment, '--knn-k', '5',
                              *common_flags(data_root, tmp_path / 'out')])
    assert_all_contiguous(conv_inputs)


@pytest.mark.parametrize('attack', ['badencoder', 'drupe'])
def test_stage1_feeds_contiguous_batches(conv_inputs, data_root, tmp_path, tiny_encoder, trigger_file,
                                         reference_file, three_references, attack):
    extra = ['--attack', 'drupe', '--drupe_warmup_epochs', '0', '--drupe_preserve_from', '1'] \
        if attack == 'drupe' else []
    train_badencoder.main(['--pretraining_dataset', 'synthetic_shapes', '--shadow_dataset', 'synthetic_shapes',
                           '--encoder_usage_info', 'synthetic_shapes', '--downstreamTask', 'synthetic_digits',
                           '--pretrained_encoder', str(tiny_encoder), '--trigger_file', str(trigger_file),
                           '--reference_file', str(three_references if attack == 'drupe' else reference_file),
                           '--batch_size', '32', '--shadow_fraction', '0.25', '--epochs', '1', '--augment', 'tensor',
                           *extra, *common_flags(data_root, tmp_path / 'out')])
    assert_all_contiguous(conv_inputs)


def test_mimic_feeds_contiguous_batches(conv_inputs, data_root, tmp_path, tiny_encoder):
    MIMIC.main(['--pretraining_dataset', 'synthetic_shapes', '--teacher', str(tiny_encoder), '--ratio', '0.25',
                '--batch_size', '32', '--epochs', '1', '--mi_epochs', '1', '--augment', 'tensor',
                *common_flags(data_root, tmp_path / 'out')])
    assert_all_contiguous(conv_inputs)


@pytest.mark.parametrize('defence', BASELINES)
def test_every_defence_feeds_contiguous_batches(conv_inputs, data_root, tmp_path, tiny_encoder, defence):
    extra = {'anp': ['--anp_iterations', '2'], 'invert': ['--invert_steps', '2'],
             'sslcleanse': ['--invert_steps', '2']}.get(defence, [])
    baseline_defence.main(['--defence', defence, '--pretraining_dataset', 'synthetic_shapes',
                           '--teacher', str(tiny_encoder), '--ratio', '0.25', '--batch_size', '32', '--epochs', '1',
                           '--augment', 'tensor', *extra, *common_flags(data_root, tmp_path / 'out')])
    if defence == 'clp':  # data-free: it reads no image and runs no convolution
        assert not conv_inputs
    else:
        assert_all_contiguous(conv_inputs)


def test_probe_feature_pass_is_contiguous(conv_inputs, data_root, tmp_path, tiny_encoder, trigger_file,
                                          reference_file):
    training_downstream_classifier.main(['--dataset', 'synthetic_digits', '--encoder_usage_info', 'synthetic_shapes',
                                         '--encoder', str(tiny_encoder), '--trigger_file', str(trigger_file),
                                         '--reference_file', str(reference_file), '--reference_label', '1',
                                         '--nn_epochs', '1', *common_flags(data_root, tmp_path / 'out')])
    assert_all_contiguous(conv_inputs)


# ------------------------------------------------------------------------------- the crash the issue reported

FAILING_CASE = textwrap.dedent('''
    import numpy as np, torch
    from datasets import normalize_batch
    from models import SimCLR
    torch.set_num_threads(2)
    torch.manual_seed(0)
    encoder = SimCLR(width=8).f.train()
    for module in encoder.modules():  # BadEncoder's frozen BatchNorm
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    optimiser = torch.optim.SGD(encoder.parameters(), lr=0.01)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (385, 32, 32, 3), dtype=np.uint8))
    batch = normalize_batch(images, ((0.5,) * 3, (0.25,) * 3))  # as stage 1 makes its shadow batches
    for step in range(5):
        loss = encoder(batch).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print('finished', torch.isfinite(loss).item())
''')


@pytest.mark.process
def test_width8_backward_through_the_batch_path_finishes_with_two_threads():
    """The issue's case: a width-8 encoder, frozen BatchNorm, a (385, 3, 32, 32) batch from the uint8 path, five
    SGD steps with two threads. Before the fix it died by SIGSEGV or SIGABRT on AVX-512 CPUs; on others (AVX2, ARM)
    oneDNN takes kernels without that bug, and the test checks only that the run ends normally there."""
    done = subprocess.run([sys.executable, '-c', FAILING_CASE], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='2'))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ['finished', 'True']
