"""models.simclr: the original state_dict layout, normalised outputs, tapped layers, width multiplier; models.resnet
against torchvision's ResNet."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import run_script
from models import ARCHITECTURES, PAPER_WIDTH, TAPPED_LAYERS, MLPProbe, SimCLR, SimCLRBase, feature_dim_of


class ReferenceBase(nn.Module):
    """The original `SimCLRBase`, written out here from torchvision as the BadEncoder code builds it."""

    def __init__(self, arch: str):
        super().__init__()
        children = []
        for name, module in getattr(torchvision.models, arch)().named_children():
            if name == 'conv1':
                module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
                children.append(module)
        self.f = nn.Sequential(*children)


class ReferenceSimCLR(nn.Module):
    def __init__(self, arch: str, feature_dim: int = 128):
        super().__init__()
        self.f = ReferenceBase(arch)
        d = 2048 if arch == 'resnet50' else 512
        self.g = nn.Sequential(nn.Linear(d, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                               nn.Linear(512, feature_dim, bias=True))


def keys_and_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50'])
def test_state_dict_is_exactly_the_original_layout(arch):
    with torch.device('meta'):  # shapes only: no memory, no initialisation cost
        ours, reference = SimCLR(arch=arch), ReferenceSimCLR(arch)
    assert keys_and_shapes(ours) == keys_and_shapes(reference)
    keys = [key for key, _ in keys_and_shapes(ours)]
    assert keys[0] == 'f.f.0.weight' and keys[-2:] == ['g.3.weight', 'g.3.bias']
    assert not any(key.startswith(('f.f.8', 'fc.', 'f.fc')) for key in keys)


def test_paper_width_model_is_initialised_as_the_original():
    torch.manual_seed(5)
    reference = ReferenceSimCLR('resnet18').state_dict()
    torch.manual_seed(5)
    ours = SimCLR().state_dict()
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key


def test_f_is_the_sequential_of_the_spec():
    with torch.device('meta'):
        model = SimCLR()
    layers = list(model.f.f)
    assert [type(layer) for layer in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Sequential,
                                                  nn.Sequential, nn.Sequential, nn.Sequential,
                                                  nn.AdaptiveAvgPool2d]
    conv = layers[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.bias) == (3, 64, (3, 3), (1, 1), (1, 1), None)


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return SimCLR(width=8).eval()


@pytest.fixture(scope='module')
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_forward_returns_normalised_feature_and_projection(tiny_model, images):
    with torch.no_grad():
        feature, projection = tiny_model(images)
        raw = tiny_model.f(images)
        expected_projection = F.normalize(tiny_model.g(raw), dim=-1)
    assert feature.shape == (4, 64) and projection.shape == (4, 128)
    torch.testing.assert_close(feature.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(projection.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(feature, F.normalize(raw, dim=-1))
    torch.testing.assert_close(projection, expected_projection)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))  # f itself is unnormalised


def test_taps_are_the_stage_outputs_of_the_same_pass(tiny_model, images):
    with torch.no_grad():
        feature, projection, taps = tiny_model(images, return_taps=True)
        plain_feature, plain_projection = tiny_model(images)
        x, stage_outputs = images, {}
        for index, layer in enumerate(tiny_model.f.f):
            x = layer(x)
            stage_outputs[index] = x
    assert TAPPED_LAYERS == (3, 4, 5, 6)
    assert len(taps) == 4
    for tap, index in zip(taps, TAPPED_LAYERS):
        torch.testing.assert_close(tap, stage_outputs[index], rtol=0, atol=0)
    assert [tuple(t.shape) for t in taps] == [(4, 8, 32, 32), (4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]
    torch.testing.assert_close(feature, plain_feature)
    torch.testing.assert_close(projection, plain_projection)


def test_taps_carry_gradients_for_distillation(images):
    torch.manual_seed(0)
    model = SimCLR(width=8)
    _, _, taps = model(images, return_taps=True)
    taps[0].pow(2).mean().backward()
    assert model.f.f[0].weight.grad is not None and model.f.f[0].weight.grad.abs().sum() > 0
    assert model.f.f[6][0].conv1.weight.grad is None  # layer4 lies after the first tap


def test_taps_use_one_forward_pass(tiny_model, images):
    calls = []
    handles = [tiny_model.f.f[index].register_forward_hook(lambda *_, i=index: calls.append(i))
               for index in TAPPED_LAYERS]
    try:
        with torch.no_grad():
            tiny_model(images, return_taps=True)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(TAPPED_LAYERS)  # each tapped layer ran once: no second pass for the maps


@pytest.mark.parametrize('arch, expected', [('resnet18', 512), ('resnet34', 512), ('resnet50', 2048)])
def test_feature_dim_of(arch, expected):
    assert feature_dim_of(arch) == expected
    assert feature_dim_of(arch, PAPER_WIDTH) == expected
    assert feature_dim_of(arch, 8) == expected // 8


@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
def test_width_multiplier_scales_every_stage(arch, images):
    torch.manual_seed(0)
    model = SimCLR(feature_dim=32, arch=arch, width=8).eval()
    with torch.no_grad():
        feature, projection, taps = model(images[:2], return_taps=True)
        raw = model.f(images[:2])
    expansion = 4 if arch == 'resnet50' else 1
    assert raw.shape == (2, feature_dim_of(arch, 8))
    assert feature.shape == (2, feature_dim_of(arch, 8)) and projection.shape == (2, 32)
    assert [t.shape[1] for t in taps] == [8 * expansion, 16 * expansion, 32 * expansion, 64 * expansion]
    assert model.f.f[0].weight.shape == (8, 3, 3, 3)
    assert model.g[0].weight.shape == (512, feature_dim_of(arch, 8))
    assert model.config == {'arch': arch, 'width': 8, 'feature_dim': 32}


def test_narrow_model_has_the_same_keys_as_the_paper_model():
    with torch.device('meta'):
        narrow, paper = SimCLR(width=8), SimCLR()
    assert list(narrow.state_dict()) == list(paper.state_dict())
    assert paper.config == {'arch': 'resnet18', 'width': 64, 'feature_dim': 128}


def test_base_alone_returns_flat_features(images):
    base = SimCLRBase(width=8).eval()
    with torch.no_grad():
        feature, taps = base.forward_with_taps(images)
        torch.testing.assert_close(feature, base(images))
    assert feature.shape == (4, 64) and len(taps) == 4


@pytest.mark.parametrize('arch, width', [('resnet101', 64), ('resnet18', 0)])
def test_bad_architecture_is_refused(arch, width):
    with pytest.raises(ValueError, match=arch if width else 'width'):
        SimCLR(arch=arch, width=width)


def test_works_in_float64(images):
    torch.manual_seed(0)
    model = SimCLR(width=8).double().eval()
    with torch.no_grad():
        feature, projection = model(images.double())
    assert feature.dtype == projection.dtype == torch.float64


def test_mlp_probe_layout():
    torch.manual_seed(0)
    probe = MLPProbe(64, (32, 16), 43)
    assert keys_and_shapes(probe) == [('fc1.weight', (32, 64)), ('fc1.bias', (32,)), ('fc2.weight', (16, 32)),
                                      ('fc2.bias', (16,)), ('fc3.weight', (43, 16)), ('fc3.bias', (43,))]
    x = torch.randn(5, 64)
    assert probe(x).shape == (5, 43)
    probe.eval()
    torch.testing.assert_close(probe(x), probe(x))  # dropout only in training
    expected = probe.fc3(F.relu(probe.fc2(F.relu(probe.fc1(x)))))
    torch.testing.assert_close(probe(x), expected)


# --- models.resnet: torchvision's ResNet without torchvision -------------------------------------------------------

@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50'])
def test_resnet_is_torchvisions_with_the_same_seed(arch):
    """The same keys in the same order, the same initial weights from the same seed, the same outputs."""
    from models import resnet
    block, layers = ARCHITECTURES[arch]
    torch.manual_seed(3)
    theirs = getattr(torchvision.models, arch)()
    torch.manual_seed(3)
    ours = resnet.ResNet(block, layers)
    reference, state = theirs.state_dict(), ours.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[key], reference[key]) for key in reference)
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False):
        theirs.train(train), ours.train(train)
        assert torch.equal(ours(x), theirs(x))


def test_a_narrow_encoder_draws_the_weights_it_drew_with_torchvisions_resnet(monkeypatch):
    """Width 8 builds the paper's ResNet first and then rebuilds its stages: the same draws as when
    models.simclr built it from torchvision, so a seed's run is the run it was."""
    import models.simclr
    torch.manual_seed(4)
    ours = SimCLR(width=8).state_dict()
    monkeypatch.setattr(models.simclr, 'resnet', torchvision.models.resnet)
    monkeypatch.setitem(models.simclr.ARCHITECTURES, 'resnet18',
                        (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]))
    torch.manual_seed(4)
    before = SimCLR(width=8).state_dict()
    assert list(ours) == list(before) and all(torch.equal(ours[key], before[key]) for key in before)


@pytest.mark.process
def test_stages_on_the_tensor_path_never_import_torchvision(data_root, tmp_path):
    """torchvision's import costs every stage process seconds (models/resnet.py): stage 0 and MIMIC (whose training
    loop the baselines share) on the tensor path run without it; their PIL transforms are made, never applied. So
    does `datasets.prepare` on a synthetic set (torchvision reads only the real sets' raw files), and so does naming
    GTSRB's raw files (read from its own folders)."""
    common = ['--data_root', str(data_root), '--device', 'cpu', '--num_workers', '0', '--no_progress',
              '--augment', 'tensor']
    clean = ['--pretraining_dataset', 'synthetic_shapes', '--width', '8', '--batch_size', '64', '--epochs', '1',
             '--results_dir', str(tmp_path / 'clean'), *common]
    mimic = ['--pretraining_dataset', 'synthetic_shapes', '--teacher', str(tmp_path / 'clean' / 'model_1.pth'),
             '--ratio', '0.25', '--batch_size', '32', '--epochs', '1', '--mi_epochs', '1',
             '--results_dir', str(tmp_path / 'mimic'), *common]
    prepare = ['synthetic_digits', '--out', str(tmp_path / 'prepared'), '--sizes', 'train=30,test=10']
    code = ('import sys, train_clean_encoder, MIMIC\nfrom datasets import prepare\n'
            f'prepare.main({prepare!r})\nprepare.raw_files("gtsrb")\ntrain_clean_encoder.main({clean!r})\n'
            f'MIMIC.main({mimic!r})\n'
            'print("torchvision" in sys.modules)')
    result = run_script('-c', code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / 'mimic' / 'model1.pth').is_file() and (tmp_path / 'prepared' / 'synthetic_digits').is_dir()
    assert result.stdout.strip().splitlines()[-1] == 'False'
