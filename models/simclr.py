"""The SimCLR encoder of the BadEncoder/MIMIC papers (docs/DESIGN.md §3).

`SimCLR.f.f` is an `nn.Sequential` of torchvision's ResNet children with a CIFAR-style stem
(3x3 conv, stride 1, no max-pool) and no `fc`, so that the state_dict keys are exactly those of the
original code (`f.f.0.weight`, `f.f.3.0.conv1.weight`, ..., `g.3.bias`) and checkpoints move freely
between the two implementations.

Indices of `f.f`: 0 conv1, 1 bn1, 2 relu, 3 layer1, 4 layer2, 5 layer3, 6 layer4, 7 avgpool.
Layers 3..6 are the *tapped* layers that MIMIC measures and distils; `forward(x, return_taps=True)`
returns their outputs from the same pass that computes the feature.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import resnet  # torchvision's ResNet, without importing torchvision

ARCHITECTURES = {
    # name: (block, blocks per stage)
    'resnet18': (resnet.BasicBlock, [2, 2, 2, 2]),
    'resnet34': (resnet.BasicBlock, [3, 4, 6, 3]),
    'resnet50': (resnet.Bottleneck, [3, 4, 6, 3]),
}
PAPER_WIDTH = 64
TAPPED_LAYERS = (3, 4, 5, 6)
PROJECTION_HIDDEN = 512


def check_architecture(arch: str, width: int) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}', expected one of {sorted(ARCHITECTURES)}")
    if width < 1:
        raise ValueError(f'width must be a positive number of channels, got {width}')


def feature_dim_of(arch: str, width: int = PAPER_WIDTH) -> int:
    """Dimension of `f(x)`: 512 for resnet18/34 and 2048 for resnet50 at the paper's width."""
    block, _ = ARCHITECTURES[arch]
    return width * 8 * block.expansion


def _resnet_trunk(arch: str, width: int) -> nn.Module:
    """torchvision's ResNet, with every stage scaled to `width` base channels when width != 64."""
    block, blocks = ARCHITECTURES[arch]
    net = resnet.ResNet(block, blocks)
    if width == PAPER_WIDTH:
        return net  # exactly the original: same modules, same initialisation
    net.inplanes = width
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, blocks[0])
    net.layer2 = net._make_layer(block, width * 2, blocks[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, blocks[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, blocks[3], stride=2)
    for module in net.modules():  # torchvision's initialisation, applied to the rebuilt stages
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    return net


class SimCLRBase(nn.Module):
    """The encoder `f`: `f(x)` is the flattened, pooled, *unnormalised* feature (B, d)."""

    def __init__(self, arch: str = 'resnet18', width: int = PAPER_WIDTH):
        super().__init__()
        check_architecture(arch, width)
        children = []
        for name, module in _resnet_trunk(arch, width).named_children():
            if name == 'conv1':
                module = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
                children.append(module)
        self.f = nn.Sequential(*children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.f(x), start_dim=1)

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass returning the feature (B, d) and the outputs of the tapped layers 3..6."""
        taps = []
        for index, layer in enumerate(self.f):
            x = layer(x)
            if index in TAPPED_LAYERS:
                taps.append(x)
        return torch.flatten(x, start_dim=1), taps


RAW_INPUTS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (mean, std) of an encoder trained on un-normalised images


class SimCLR(nn.Module):
    """Encoder `f` plus projection head `g`; `forward` returns L2-normalised (feature, projection).

    `raw_inputs`: the encoder was trained on un-normalised pixels in [0, 1] (stage 0's --no_normalize, CTRL's
    recipe); every stage then feeds it such pixels (`input_normalization`), and its checkpoints record it.
    """

    def __init__(self, feature_dim: int = 128, arch: str = 'resnet18', width: int = PAPER_WIDTH,
                 raw_inputs: bool = False):
        super().__init__()
        self.arch, self.width, self.feature_dim, self.raw_inputs = arch, width, feature_dim, raw_inputs
        self.f = SimCLRBase(arch, width)
        d = feature_dim_of(arch, width)
        self.g = nn.Sequential(
            nn.Linear(d, PROJECTION_HIDDEN, bias=False),
            nn.BatchNorm1d(PROJECTION_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(PROJECTION_HIDDEN, feature_dim, bias=True),
        )

    @property
    def config(self) -> dict:
        """What a checkpoint records so that later stages rebuild this model without flags (`raw_inputs` only when
        set, so that every other checkpoint keeps the keys it always had)."""
        config = {'arch': self.arch, 'width': self.width, 'feature_dim': self.feature_dim}
        return {**config, 'raw_inputs': True} if self.raw_inputs else config

    def forward(self, x: torch.Tensor, return_taps: bool = False):
        if return_taps:
            feature, taps = self.f.forward_with_taps(x)
        else:
            feature = self.f(x)
        out = (F.normalize(feature, dim=-1), F.normalize(self.g(feature), dim=-1))
        return (*out, taps) if return_taps else out


def input_normalization(model: nn.Module, normalization: tuple) -> tuple:
    """The (mean, std) the stages apply to `model`'s inputs: its pre-training set's `normalization`, or none
    (RAW_INPUTS: mean 0, std 1) for an encoder trained on un-normalised pixels."""
    return RAW_INPUTS if getattr(model, 'raw_inputs', False) else normalization
