"""Real-world encoders: CLIP's RN50 image tower, the released code's ImageNet SimCLR ResNet-50, torchvision's
ResNets (docs/DESIGN.md §3.1).

The released code (inherited from BadEncoder) handles two encoders beside the CIFAR-style SimCLR, each loaded
into a `.visual` module: `CLIP(1024, 224, vision_layers=(3, 4, 6, 3), vision_width=64).visual`, OpenAI's
ModifiedResNet, and `ImageNetResNet().visual`, a torchvision-layout ResNet-50 whose forward stops at the pooled
feature. `VisualEncoder.visual` has exactly their state_dict keys and shapes (and so OpenAI's RN50 checkpoint's
`visual.*` tensors, and torchvision's `resnet50()` for the ImageNet tower), so weights move both ways.

Each family (`FAMILIES`) declares what the stages need: the input size, the normalisation, the feature the
probe reads and the four stages that MIMIC measures and distils (ResNet layer1..layer4, the CIFAR SimCLR's
layers 3..6). `VisualEncoder` adds the CIFAR SimCLR's projection head `g` and its calling convention:
`forward(x)` returns (normalize(f(x)), normalize(g(f(x)))), `forward(x, return_taps=True)` adds the four tapped
maps from the same pass, and `f` is the feature extractor.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import resnet  # torchvision's ResNet, without importing torchvision
from .simclr import PROJECTION_HIDDEN, SimCLR, input_normalization

CLIP_NORMALIZATION = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The released code feeds its ImageNet SimCLR ResNet-50 ToTensor() pixels in [0, 1], unnormalised
# (`test_transform_imagenet`): SimCLR's TensorFlow models, converted to PyTorch, take raw pixels.
UNIT_NORMALIZATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
TAPPED_STAGES = ('layer1', 'layer2', 'layer3', 'layer4')


# --- CLIP's ModifiedResNet (OpenAI CLIP, clip/model.py) -------------------------------------------------------

class CLIPBottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased striding: every conv has stride 1, and a stride-s block average-pools
    (s x s) after its 3x3 conv and before its shortcut's 1x1 conv."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != outplanes:
            # keys downsample.0 / downsample.1, as OpenAI's: the parameter-free pool is named '-1'
            self.downsample = nn.Sequential(OrderedDict([
                ('-1', nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ('0', nn.Conv2d(inplanes, outplanes, 1, bias=False)),
                ('1', nn.BatchNorm2d(outplanes)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's pooling: multi-head attention of the mean token (plus positions) over all H·W+1 tokens.

    Only the mean token's query is computed: the released code runs full self-attention and keeps token 0,
    which is the same result. At the trained grid (7x7 for 224 px) the positional embedding is used as stored;
    at another grid its spatial part is resized bicubically (not in the released code, which fails there), so
    that small test images and fast runs work.
    """

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.grid, self.heads = grid, heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """The positional embedding for a height x width map: (1 + H·W, C)."""
        if (height, width) == (self.grid, self.grid):
            return self.positional_embedding
        token, spatial = self.positional_embedding[:1], self.positional_embedding[1:]
        spatial = spatial.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        spatial = F.interpolate(spatial, size=(height, width), mode='bicubic', align_corners=False)
        return torch.cat([token, spatial.flatten(2)[0].t()])  # (1 + H·W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1 + H·W, C)
        tokens = tokens + self.positions(height, width).to(tokens.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        query = heads(self.q_proj(tokens[:, :1]))  # (B, heads, 1, C / heads)
        pooled = F.scaled_dot_product_attention(query, heads(self.k_proj(tokens)), heads(self.v_proj(tokens)))
        return self.c_proj(pooled.transpose(1, 2).reshape(batch, channels))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: a 3-conv stem with an average pool, anti-aliased bottlenecks, attention pool.

    `ModifiedResNet()` is RN50: `CLIP(1024, 224, vision_layers=(3, 4, 6, 3), vision_width=64).visual` of the
    released code, heads = width·32/64. Initialised as OpenAI's CLIP initialises it for training from scratch
    (the attention projections ~ N(0, 1/C), every bottleneck's last BatchNorm γ = 0).
    """

    def __init__(self, layers=(3, 4, 6, 3), output_dim: int = 1024, heads: int | None = None,
                 input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim, self.input_resolution = output_dim, input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2 ** index
            stage = [CLIPBottleneck(inplanes, planes, stride)]
            inplanes = planes * CLIPBottleneck.expansion
            stage += [CLIPBottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f'layer{index + 1}', nn.Sequential(*stage))
        embed_dim = width * 32  # the last stage's channels
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads or embed_dim // 64, output_dim)
        self._initialise()

    def _initialise(self) -> None:
        std = self.attnpool.c_proj.in_features ** -0.5
        for projection in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(projection.weight, std=std)
        for module in self.modules():
            if isinstance(module, CLIPBottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: the pooled feature (B, output_dim) and the outputs of layer1..layer4 (B, C_l, H_l, W_l)."""
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)  # (B, width, H/4, W/4)
        taps = []
        for stage in TAPPED_STAGES:
            x = getattr(self, stage)(x)
            taps.append(x)
        return self.attnpool(x), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_taps(x)[0]


# --- torchvision's ResNet, as the released code's ImageNetResNet().visual ---------------------------------------

RESNETS = {
    'resnet18': (resnet.BasicBlock, [2, 2, 2, 2]),
    'resnet34': (resnet.BasicBlock, [3, 4, 6, 3]),
    'resnet50': (resnet.Bottleneck, [3, 4, 6, 3]),
}


class ResNetTower(resnet.ResNet):
    """torchvision's ImageNet-stem ResNet whose forward stops at the flattened pooled feature.

    `fc` (1000 classes) stays in the state_dict, as in the released code's `ImageNetResNet().visual` and in
    torchvision's checkpoints, but is not used: it is frozen (requires_grad False), so that no optimiser and no
    DistributedDataParallel waits for a gradient it never gets. Initialisation is torchvision's (the released
    code's is the same).
    """

    def __init__(self, arch: str = 'resnet50', shortcut_first: bool = False):
        block, layers = RESNETS[arch]
        super().__init__(block, layers)
        self.arch = arch
        self.fc.requires_grad_(False)
        if shortcut_first:  # the released code's Bottleneck registers `downsample` first: its state_dict order
            for stage in TAPPED_STAGES:
                first = getattr(self, stage)[0]
                if first.downsample is not None:
                    first._modules = {'downsample': first._modules.pop('downsample'), **first._modules}

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: the pooled feature (B, 512·expansion) and the outputs of layer1..layer4."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        taps = []
        for stage in TAPPED_STAGES:
            x = getattr(self, stage)(x)
            taps.append(x)
        return torch.flatten(self.avgpool(x), start_dim=1), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_taps(x)[0]


# --- the families ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderFamily:
    """What the stages need to know of a real-world encoder."""
    name: str
    build: Callable[[], nn.Module]  # the `.visual` tower, freshly initialised
    feature_dim: int  # the feature the probe reads: the tower's output
    feature: str  # which output that is, in words
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) of ToTensor pixels in [0, 1]
    source: str  # whose keys and shapes `.visual` reproduces
    usage_info: str | None = None  # the released code's --encoder_usage_info for it
    input_size: int = 224


FAMILIES = {family.name: family for family in (
    EncoderFamily('clip_rn50', ModifiedResNet, 1024, 'the attention pool (c_proj output)', CLIP_NORMALIZATION,
                  "the released code's CLIP(1024, 224, vision_layers=(3, 4, 6, 3), vision_width=64).visual "
                  "= OpenAI's RN50 visual.*", usage_info='CLIP'),
    EncoderFamily('imagenet_resnet50', lambda: ResNetTower('resnet50', shortcut_first=True), 2048,
                  'the global average pool (fc unused)', UNIT_NORMALIZATION,
                  "the released code's ImageNetResNet().visual (SimCLR ResNet-50)", usage_info='imagenet'),
    *(EncoderFamily(f'torchvision_{arch}', lambda arch=arch: ResNetTower(arch), 512 * block.expansion,
                    'the global average pool (fc unused)', IMAGENET_NORMALIZATION, f'torchvision.models.{arch}()')
      for arch, (block, _) in RESNETS.items()),
)}
USAGE_INFO_FAMILIES = {family.usage_info: name for name, family in FAMILIES.items() if family.usage_info}


def family_of(name: str) -> EncoderFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown encoder family '{name}', expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def resolve_family(encoder_usage_info: str | None = None, arch: str | None = None) -> str | None:
    """The family the flags ask for: `--encoder_usage_info CLIP|imagenet` (the released code's names) or
    `--arch <family>`; None when they name a CIFAR-style SimCLR (cifar10, stl10, resnet18, ...)."""
    by_usage = USAGE_INFO_FAMILIES.get(encoder_usage_info or '')
    by_arch = arch if arch in FAMILIES else None
    if by_usage and by_arch and by_usage != by_arch:
        raise ValueError(f'--encoder_usage_info {encoder_usage_info} is the {by_usage} encoder, '
                         f'but --arch is {arch}')
    return by_usage or by_arch


class VisualEncoder(nn.Module):
    """A real-world tower `visual` plus the SimCLR projection head `g`, called like `models.SimCLR`.

    `f` is the tower itself: `f(x)` is the unnormalised feature the probe reads (B, feature_dim of the family).
    `g`: Linear(d, 512, bias=False) → BatchNorm1d(512) → ReLU → Linear(512, feature_dim), as the CIFAR SimCLR's;
    it is not part of the released layouts (their files hold `visual` only) and serves MIMIC's contrastive term.
    """

    def __init__(self, family: str = 'clip_rn50', feature_dim: int = 128):
        super().__init__()
        spec = family_of(family)
        self.family, self.feature_dim = family, feature_dim
        self.input_size, self.normalization = spec.input_size, spec.normalization
        self.visual = spec.build()
        self.g = nn.Sequential(
            nn.Linear(spec.feature_dim, PROJECTION_HIDDEN, bias=False),
            nn.BatchNorm1d(PROJECTION_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(PROJECTION_HIDDEN, feature_dim, bias=True),
        )

    @property
    def f(self) -> nn.Module:
        return self.visual

    @property
    def config(self) -> dict:
        """What a checkpoint records so that later stages rebuild this model without flags."""
        return {'family': self.family, 'feature_dim': self.feature_dim}

    @property
    def tapped_modules(self) -> tuple[str, ...]:
        """The qualified names of the four tapped stages (for reports such as mi.json's `layers`)."""
        return tuple(f'visual.{stage}' for stage in TAPPED_STAGES)

    def forward(self, x: torch.Tensor, return_taps: bool = False):
        if return_taps:
            feature, taps = self.visual.forward_with_taps(x)
        else:
            feature = self.visual(x)
        out = (F.normalize(feature, dim=-1), F.normalize(self.g(feature), dim=-1))
        return (*out, taps) if return_taps else out


def encoder_normalization(model: nn.Module, normalization: tuple) -> tuple:
    """The (mean, std) every stage applies to `model`'s inputs: a real-world encoder's own (its family's, whatever
    the data), else `models.input_normalization(model, normalization)` (its pre-training set's, or none)."""
    if isinstance(model, VisualEncoder):
        return model.normalization
    return input_normalization(model, normalization)


def encoder_input_size(model: nn.Module) -> int | None:
    """The image size a real-world encoder takes (224): every image it sees is brought to it; None for a CIFAR
    SimCLR, which takes its data at the data's own size (32)."""
    return model.input_size if isinstance(model, VisualEncoder) else None


def build_encoder(config: dict) -> nn.Module:
    """The model a recorded config describes: a VisualEncoder when it names a `family`, else models.SimCLR."""
    if 'family' in config:
        return VisualEncoder(**config)
    return SimCLR(**config)


__all__ = ['FAMILIES', 'USAGE_INFO_FAMILIES', 'EncoderFamily', 'VisualEncoder', 'ModifiedResNet', 'ResNetTower',
           'AttentionPool2d', 'CLIPBottleneck', 'TAPPED_STAGES', 'CLIP_NORMALIZATION', 'IMAGENET_NORMALIZATION',
           'UNIT_NORMALIZATION', 'build_encoder', 'encoder_input_size', 'encoder_normalization', 'family_of',
           'resolve_family']
