"""The fast data path (--augment tensor): uint8 data on the device, batched augmentation, same results
on resume. On a CPU-only machine it runs on the CPU, which exercises the same code as on CUDA."""
from __future__ import annotations

import argparse

import numpy as np
import torch

from conftest import run_in_process
from datasets import ImagePairs, simclr_transform
from datasets.fastpath import DevicePairBatches, pair_batches, use_tensor_augment
from models import load_checkpoint

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_auto_picks_tensor_on_cuda_only():
    args = argparse.Namespace(augment='auto')
    assert use_tensor_augment(args, torch.device('cuda', 0))
    assert not use_tensor_augment(args, torch.device('cpu'))
    assert use_tensor_augment(argparse.Namespace(augment='tensor'), torch.device('cpu'))
    assert not use_tensor_augment(argparse.Namespace(augment='pil'), torch.device('cuda', 0))


def test_device_batches_shape_order_and_reproducibility():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8))
    batches = list(DevicePairBatches(images, NORM, 32, seed=1, epoch=3))
    assert len(batches) == 2  # the last partial batch is dropped, as the PIL loader's drop_last
    assert all(v1.shape == v2.shape == (32, 3, 32, 32) and v1.dtype == torch.float32 for v1, v2 in batches)
    assert not torch.equal(batches[0][0], batches[0][1])  # two independent views
    again = list(DevicePairBatches(images, NORM, 32, seed=1, epoch=3))
    other = list(DevicePairBatches(images, NORM, 32, seed=1, epoch=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not torch.equal(batches[0][0], other[0][0])


def test_pair_batches_switches_paths():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    pairs = ImagePairs(images, simclr_transform(NORM))
    args = argparse.Namespace(augment='pil', batch_size=16, seed=0, num_workers=0)
    loader = pair_batches(pairs, args, NORM, 1, torch.device('cpu'))
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 2
    args.augment = 'tensor'
    assert isinstance(pair_batches(pairs, args, NORM, 1, torch.device('cpu')), DevicePairBatches)


def test_stage0_and_stage2_on_the_tensor_path_resume_bit_identically(tmp_path, data_root, tiny_encoder):
    common = ['--data_root', str(data_root), '--device', 'cpu', '--no_progress', '--augment', 'tensor',
              '--batch_size', '32']
    clean = ['train_clean_encoder.py', '--pretraining_dataset', 'synthetic_shapes', '--width', '8', *common]
    straight = run_in_process(*clean, '--epochs', '2', '--results_dir', str(tmp_path / 'straight'))
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert run_in_process(*clean, '--epochs', '1', '--results_dir', str(tmp_path / 'split')).returncode == 0
    resumed = run_in_process(*clean, '--epochs', '2', '--resume', '--results_dir', str(tmp_path / 'split'))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / 'straight' / 'model_2.pth')['state_dict']
    b = load_checkpoint(tmp_path / 'split' / 'model_2.pth')['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)

    mimic = run_in_process('MIMIC.py', '--pretraining_dataset', 'synthetic_shapes', '--teacher', str(tiny_encoder),
                           '--ratio', '0.25', '--epochs', '1', '--mi_epochs', '1', '--results_dir',
                           str(tmp_path / 'mimic'), *common)
    assert mimic.returncode == 0, mimic.stderr[-2000:]
    assert load_checkpoint(tmp_path / 'mimic' / 'model1.pth')['epoch'] == 1


def test_badencoder_on_the_tensor_path_plants_the_backdoor(tmp_path, data_root, trigger_file, reference_file,
                                                           tiny_encoder):
    from datasets.fastpath import DeviceShadowBatches
    references = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    indices, views = next(iter(DeviceShadowBatches(50, references, NORM, 16, seed=0, epoch=1)))
    assert indices.shape == (16,) and views.shape == (16, 2, 3, 32, 32)
    assert not torch.equal(views[0, 0], views[1, 0])  # a fresh augmentation per batch element

    out = tmp_path / 'bad'
    result = run_in_process('train_badencoder.py', '--pretraining_dataset', 'synthetic_shapes', '--shadow_dataset',
                            'synthetic_shapes', '--encoder_usage_info', 'synthetic_shapes', '--downstreamTask',
                            'synthetic_digits', '--pretrained_encoder', str(tiny_encoder), '--trigger_file',
                            str(trigger_file), '--reference_file', str(reference_file), '--batch_size', '32',
                            '--epochs', '2', '--lr', '0.05', '--results_dir', str(out), '--data_root', str(data_root),
                            '--device', 'cpu', '--no_progress', '--augment', 'tensor')
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (out / 'log.csv').read_text().splitlines()
    loss0 = [float(r.split(',')[2]) for r in rows[1:] if r.split(',')[2]]
    assert loss0[-1] < loss0[0]  # triggered inputs move towards the reference


def test_compiled_forward_shares_weights_and_keeps_checkpoint_keys():
    from datasets.fastpath import maybe_compile
    from models import SimCLR
    torch.manual_seed(0)
    model = SimCLR(width=8).eval()
    assert maybe_compile(model, False) is model
    compiled = maybe_compile(model, True, backend='eager')  # Dynamo tracing without a C++ toolchain
    x = torch.randn(4, 3, 32, 32)
    feature, out, taps = compiled(x, return_taps=True)
    reference = model(x, return_taps=True)
    assert torch.allclose(feature, reference[0]) and torch.allclose(out, reference[1]) and len(taps) == 4
    assert list(model.state_dict()) == list(SimCLR(width=8).state_dict())
    assert next(compiled.parameters()) is next(model.parameters())
