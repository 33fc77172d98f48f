"""The real-world encoders (docs/DESIGN.md §3.1): their keys and shapes, their forward, and their layouts on disk.

The big towers (CLIP RN50: 38M parameters, ResNet-50: 26M) are built once per module; files are deleted as soon as
a test has read them back.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import COMPAT, requires_compat
from models import (FAMILIES, CheckpointError, SimCLR, VisualEncoder, build_encoder, checkpoint_in_layout,
                    load_any_encoder, load_visual_encoder, resolve_family, save_atomic, save_in_layout)
from models.checkpoint import encoder_checkpoint
from models.visual import CLIP_NORMALIZATION, AttentionPool2d
from models.visual_checkpoint import fresh_layout

BIG = ('clip_rn50', 'imagenet_resnet50', 'torchvision_resnet50')
SOURCES = {'clip_rn50': 'clip_rn50_visual.json', 'imagenet_resnet50': 'imagenet_resnet50_visual.json',
           'torchvision_resnet50': 'torchvision_resnet50.json'}


def randomise_statistics(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and γ, so that a round trip that lost them would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)


@pytest.fixture(scope='module')
def encoders() -> dict[str, VisualEncoder]:
    """One encoder of each big family, eval mode, with random weights and statistics."""
    built = {}
    for seed, family in enumerate(BIG):
        torch.manual_seed(seed)
        built[family] = VisualEncoder(family).eval()
        randomise_statistics(built[family], seed)
    return built


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def read_back(path) -> dict:
    obj = torch.load(path, map_location='cpu', weights_only=True)
    path.unlink()
    return obj


# --- keys, shapes, declarations ----------------------------------------------------------------------------------

@pytest.mark.parametrize('family', BIG)
def test_keys_and_shapes_equal_the_sources(family, encoders):
    source = COMPAT / 'encoders' / SOURCES[family]
    if not source.exists():
        pytest.skip(f"{source} not present (the paper's files are optional)")
    expected = json.loads(source.read_text())['tensors']
    found = {key: list(value.shape) for key, value in encoders[family].visual.state_dict().items()}
    assert found == expected
    assert list(found) == list(expected)  # in the sources' order too: files written here read the same


@requires_compat('encoders', 'imagenet_resnet50_visual.json')
def test_the_imagenet_tower_is_torchvisions_resnet50():
    import torchvision
    expected = json.loads((COMPAT / 'encoders' / 'imagenet_resnet50_visual.json').read_text())['tensors']
    assert {k: list(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()} == expected


def test_small_torchvision_families_match_torchvision():
    import torchvision
    for arch in ('resnet18', 'resnet34'):
        expected = {k: v.shape for k, v in getattr(torchvision.models, arch)().state_dict().items()}
        assert {k: v.shape for k, v in VisualEncoder(f'torchvision_{arch}').visual.state_dict().items()} == expected


def test_families_declare_input_normalisation_feature_and_taps(encoders):
    assert set(FAMILIES) == {'clip_rn50', 'imagenet_resnet50', 'torchvision_resnet18', 'torchvision_resnet34',
                             'torchvision_resnet50'}
    assert all(spec.input_size == 224 for spec in FAMILIES.values())
    assert FAMILIES['clip_rn50'].normalization == CLIP_NORMALIZATION
    assert FAMILIES['imagenet_resnet50'].normalization == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # ToTensor only
    assert FAMILIES['torchvision_resnet50'].normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert [FAMILIES[name].feature_dim for name in sorted(FAMILIES)] == [1024, 2048, 512, 512, 2048]
    model = encoders['clip_rn50']
    assert model.tapped_modules == ('visual.layer1', 'visual.layer2', 'visual.layer3', 'visual.layer4')
    assert (model.input_size, model.normalization, model.config) == (224, CLIP_NORMALIZATION,
                                                                    {'family': 'clip_rn50', 'feature_dim': 128})


def test_resolve_family_from_the_released_flags():
    assert resolve_family('CLIP') == 'clip_rn50'
    assert resolve_family('imagenet') == 'imagenet_resnet50'
    assert resolve_family('cifar10', 'resnet18') is None
    assert resolve_family(None, 'torchvision_resnet50') == 'torchvision_resnet50'
    assert resolve_family('imagenet', 'imagenet_resnet50') == 'imagenet_resnet50'
    with pytest.raises(ValueError, match='CLIP'):
        resolve_family('CLIP', 'torchvision_resnet50')


def test_build_encoder_from_a_recorded_config(encoders):
    student = build_encoder(encoders['imagenet_resnet50'].config)
    assert isinstance(student, VisualEncoder) and student.config == encoders['imagenet_resnet50'].config
    assert isinstance(build_encoder({'arch': 'resnet18', 'width': 4, 'feature_dim': 16}), SimCLR)
    with pytest.raises(ValueError, match='unknown encoder family'):
        VisualEncoder('clip_vit_b32')


# --- forward -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', BIG)
def test_forward_at_224_returns_feature_projection_and_four_taps(family, encoders):
    model = encoders[family]
    with torch.no_grad():
        feature, projection, taps = model(torch.randn(1, 3, 224, 224), return_taps=True)
        plain = model(torch.randn(1, 3, 224, 224))
    expected_channels = [256, 512, 1024, 2048]  # every family here is a bottleneck ResNet-50 in its stages
    assert [tuple(tap.shape) for tap in taps] == [(1, c, 56 // 2 ** i, 56 // 2 ** i)
                                                 for i, c in enumerate(expected_channels)]
    assert feature.shape == (1, FAMILIES[family].feature_dim) and projection.shape == (1, 128)
    assert torch.allclose(feature.norm(dim=1), torch.ones(1)) and len(plain) == 2
    assert model.f(torch.zeros(1, 3, 224, 224)).shape == (1, FAMILIES[family].feature_dim)


def test_small_inputs_train_mode_and_gradients():
    """64-pixel images, batch statistics and a backward: the unused fc gets no gradient, the tower does."""
    model = VisualEncoder('torchvision_resnet18').train()
    feature, projection, taps = model(torch.randn(2, 3, 64, 64), return_taps=True)
    assert [tuple(tap.shape[1:]) for tap in taps] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    (projection.sum() + feature.sum()).backward()
    assert model.visual.fc.weight.grad is None and not model.visual.fc.weight.requires_grad  # fc is unused
    assert model.visual.conv1.weight.grad is not None


def test_clip_at_64_pixels(encoders):
    with torch.no_grad():
        feature, _, taps = encoders['clip_rn50'](torch.randn(2, 3, 64, 64), return_taps=True)
    assert feature.shape == (2, 1024) and taps[-1].shape == (2, 2048, 2, 2)


def test_attention_pool_is_token_zero_of_full_multi_head_attention():
    """The pool computes only the mean token's query: the released code's full self-attention, token 0."""
    torch.manual_seed(0)
    pool = AttentionPool2d(grid=3, embed_dim=32, heads=4, output_dim=16)
    x = torch.randn(2, 32, 3, 3)
    tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + pool.positional_embedding[:, None, :]
    expected, _ = F.multi_head_attention_forward(
        tokens, tokens, tokens, 32, 4, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        training=False, need_weights=False, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
    assert torch.allclose(pool(x), expected[0], atol=1e-5)
    assert pool.positions(3, 3) is pool.positional_embedding and pool.positions(2, 4).shape == (9, 32)


# --- layouts on disk ---------------------------------------------------------------------------------------------

def text_tower() -> dict:
    """A stand-in for CLIP's text tower and the JIT model's extra entries, in OpenAI's dtypes."""
    return {'positional_embedding': torch.randn(77, 8), 'text_projection': torch.randn(8, 4).half(),
            'logit_scale': torch.tensor(4.6052),
            'transformer.resblocks.0.attn.in_proj_weight': torch.randn(24, 8).half(),
            'token_embedding.weight': torch.randn(10, 8), 'input_resolution': torch.tensor(224),
            'context_length': torch.tensor(77), 'vocab_size': torch.tensor(49408)}


def users_file(layout: str, model: VisualEncoder) -> dict:
    """The file as users have it (module docstring of models/visual_checkpoint.py)."""
    visual = model.visual.state_dict()
    if layout == 'released':  # the released code's: {'state_dict': clip.visual.state_dict()}
        return {'state_dict': visual}
    if layout == 'released_model':  # BadEncoder's output: model.state_dict() of CLIP(...)
        return {'epoch': 200, 'state_dict': {f'visual.{k}': v for k, v in visual.items()}, 'optimizer': {}}
    if layout == 'bare':  # torch.save(resnet50().state_dict(), ...)
        return dict(visual)
    # OpenAI's state_dict, its convolutions and linear layers in float16 as on CUDA
    halved = {f'visual.{k}': v.half() if k.endswith('weight') and v.dim() > 1 else v for k, v in visual.items()}
    return {**text_tower(), **halved}


@pytest.mark.parametrize('family, layout', [('clip_rn50', 'released'), ('clip_rn50', 'released_model'),
                                            ('clip_rn50', 'openai'), ('imagenet_resnet50', 'released'),
                                            ('imagenet_resnet50', 'released_model'),
                                            ('torchvision_resnet50', 'bare')])
def test_round_trip_in_the_layout_it_came_in(family, layout, encoders, tmp_path):
    source = encoders[family]
    original = users_file(layout, source)
    path = tmp_path / 'suspect.pth'
    torch.save(original, path)
    model, checkpoint = load_visual_encoder(path)  # family and layout read off the file
    path.unlink()
    assert (model.family, checkpoint['layout'].format, checkpoint['layout'].family) == (family, layout, family)
    for key, value in model.visual.state_dict().items():
        assert torch.equal(value, source.visual.state_dict()[key].to(value.dtype) if layout != 'openai'
                           else original[f'visual.{key}'].to(value.dtype)), key

    out = tmp_path / 'purified.pth'
    save_in_layout(model, checkpoint['layout'], out, epoch=3, args={'seed': 0})
    written = read_back(out)
    if layout in ('bare', 'openai'):  # tensors only, exactly the file's keys (in its order) and dtypes
        assert same_tensors(written, original)
        return
    assert list(written['state_dict']) == list(original['state_dict'])
    assert all(torch.equal(written['state_dict'][k], v) for k, v in original['state_dict'].items())
    assert (written['epoch'], written['format'], written['family'], written['args']) == (3, layout, family,
                                                                                       {'seed': 0})
    # the released code loads it back: the seed's `CLIP(...).visual` / `ImageNetResNet().visual` (same keys)
    fresh = VisualEncoder(family)
    if layout == 'released':
        fresh.visual.load_state_dict(written['state_dict'], strict=True)
    else:  # BadEncoder: model.load_state_dict(checkpoint['state_dict']) of a module whose only child is .visual
        torch.nn.Module.load_state_dict(torch.nn.ModuleDict({'visual': fresh.visual}), written['state_dict'])
    assert torch.equal(fresh.visual.layer4[2].bn3.running_var, source.visual.layer4[2].bn3.running_var)


def test_projection_head_and_feature_dim_survive_a_released_round_trip(tmp_path):
    torch.manual_seed(1)
    model = VisualEncoder('torchvision_resnet18', feature_dim=32)
    path = tmp_path / 'model_1.pth'
    save_in_layout(model, fresh_layout('torchvision_resnet18'), path, epoch=1)
    loaded, checkpoint = load_visual_encoder(path)
    assert loaded.config == model.config and checkpoint['epoch'] == 1
    assert same_tensors(loaded.state_dict(), model.state_dict())


def test_a_student_is_written_in_the_teachers_layout(encoders, tmp_path):
    """A fresh student of the teacher's config, saved with the teacher's layout, keeps OpenAI's text tower."""
    path = tmp_path / 'clip.pt'
    original = users_file('openai', encoders['clip_rn50'])
    torch.save(original, path)
    teacher, checkpoint = load_any_encoder(path, family='clip_rn50')
    student = build_encoder(teacher.config)
    written = checkpoint_in_layout(student, checkpoint['layout'])
    assert all(written[k].dtype == original[k].dtype and torch.equal(written[k], original[k]) for k in text_tower())
    assert torch.equal(written['visual.conv1.weight'], student.visual.conv1.weight.half())
    with pytest.raises(ValueError, match='cannot be written'):
        checkpoint_in_layout(VisualEncoder('torchvision_resnet18'), checkpoint['layout'])


# --- what the user gets for a file that does not fit ------------------------------------------------------------

def test_mismatch_is_one_line_naming_the_file_and_keys(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(VisualEncoder('torchvision_resnet18').visual.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_visual_encoder(path, family='torchvision_resnet34')
    message = str(error.value)
    assert '\n' not in message and str(path) in message and 'torchvision_resnet34' in message
    assert "missing ['layer1.2.conv1.weight'" in message

    state_dict = VisualEncoder('torchvision_resnet18').visual.state_dict()
    state_dict['extra.weight'] = torch.zeros(1)
    del state_dict['layer4.1.bn2.bias']
    torch.save({'state_dict': state_dict}, path)
    with pytest.raises(CheckpointError) as error:
        load_visual_encoder(path)
    message = str(error.value)
    assert '\n' not in message and str(path) in message
    assert "missing ['layer4.1.bn2.bias']" in message and "unexpected ['extra.weight']" in message


def test_a_resnet_is_not_a_clip(encoders, tmp_path):
    path = tmp_path / 'resnet50.pth'
    torch.save(encoders['torchvision_resnet50'].visual.state_dict(), path)
    with pytest.raises(CheckpointError, match=r'does not fit the clip_rn50 encoder: missing \[.*unexpected \['):
        load_visual_encoder(path, family='clip_rn50')


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::UserWarning')  # torch.jit's deprecation notices
def test_unknown_and_cifar_files_are_refused_in_one_line(tmp_path, tiny_encoder):
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': {'encoder.weight': torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match='not an encoder of a known family'):
        load_visual_encoder(path)
    with pytest.raises(CheckpointError, match='CIFAR-style SimCLR'):
        load_visual_encoder(tiny_encoder)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match='TorchScript archive') as error:
        load_visual_encoder(path)
    assert '\n' not in str(error.value)


def test_load_any_encoder_keeps_the_cifar_path(tmp_path):
    torch.manual_seed(0)
    simclr = SimCLR(arch='resnet18', width=4, feature_dim=16)
    path = tmp_path / 'cifar.pth'
    save_atomic(encoder_checkpoint(simclr, None, 1), path)
    model, checkpoint = load_any_encoder(path)
    assert isinstance(model, SimCLR) and model.config == simclr.config and checkpoint['epoch'] == 1
    with pytest.raises(CheckpointError, match='resnet50 was asked for'):
        load_any_encoder(path, arch='resnet50')
    torch.save({'state_dict': VisualEncoder('torchvision_resnet18').visual.state_dict()}, path)
    model, checkpoint = load_any_encoder(path)
    assert isinstance(model, VisualEncoder) and checkpoint['layout'].format == 'released'
