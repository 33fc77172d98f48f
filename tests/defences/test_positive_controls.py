"""Positive controls of the baselines: a backdoor planted by hand in a known neuron, which CLP, ANP and Fine-Pruning
must each remove, and a planted trigger that DECREE's verdict must detect (and a clean encoder it must not).

The planted encoder: a width-16 SimCLR whose BatchNorm running statistics are those of clean images (as a trained
encoder's are), then stem channel PLANTED made a detector of a white patch — a 3x3 all-ones kernel and a BatchNorm
that keeps the channel at 0 unless the patch is there (dormant on clean images, 3 standard deviations of margin) —
and routed unchanged to channel PLANTED of every stage's output (the shortcuts carry it, the residual branches add
nothing to it), so the trigger moves feature coordinate PLANTED by about 90 and clean images leave it at 0.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from datasets import normalize_batch
from defences import fp
from defences.anp import anp
from defences.clp import clp
from defences.invert import decree_lambda, detection, invert_trigger
from models import SimCLR
from conftest import CornerCollapse

NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # white: (1 − 0.5)/0.25 = 2 in every channel
DEVICE = torch.device('cpu')
PLANTED = 3
PATCH = (slice(6, 11), slice(6, 11))  # 5x5 white patch; the detector's 3x3 window fits at the routed position 8


def random_images(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def with_patch(images: np.ndarray) -> np.ndarray:
    stamped = images.copy()
    stamped[:, PATCH[0], PATCH[1]] = 255
    return stamped


@torch.no_grad()
def planted_encoder(gamma: float = 60.0, margin: float = 3.0) -> SimCLR:
    torch.manual_seed(0)
    model = SimCLR(width=16)
    for module in model.modules():  # running statistics of clean images (cumulative average of one pass)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()(normalize_batch(random_images(256, seed=99), NORMALIZATION))
    model.eval()
    layers = model.f.f
    layers[0].weight[PLANTED] = 1.0  # sums 27 normalised values: 54 on the white patch, std 6 on noise
    stem_bn = layers[1]
    stem_bn.running_mean[PLANTED], stem_bn.running_var[PLANTED] = 0.0, 36.0
    stem_bn.weight[PLANTED], stem_bn.bias[PLANTED] = gamma, -margin * gamma  # fires beyond `margin` std: the patch
    for stage in layers[3:7]:
        for block in stage:
            block.bn2.weight[PLANTED], block.bn2.bias[PLANTED] = 0.0, 0.0  # the residual branch adds nothing
            if block.downsample is not None:  # the shortcut copies the channel
                block.downsample[0].weight[PLANTED] = 0.0
                block.downsample[0].weight[PLANTED, PLANTED] = 1.0
                shortcut_bn = block.downsample[1]
                shortcut_bn.running_mean[PLANTED], shortcut_bn.running_var[PLANTED] = 0.0, 1.0
                shortcut_bn.weight[PLANTED], shortcut_bn.bias[PLANTED] = 1.0, 0.0
    return model


@torch.no_grad()
def trigger_movement(model: SimCLR, images: np.ndarray) -> float:
    """How far the trigger moves the planted feature: mean |f(x')_PLANTED − f(x)_PLANTED| (eval mode)."""
    model.eval()
    clean = model.f(normalize_batch(images, NORMALIZATION))
    triggered = model.f(normalize_batch(with_patch(images), NORMALIZATION))
    return (triggered[:, PLANTED] - clean[:, PLANTED]).abs().mean().item()


@pytest.fixture(scope='module')
def suspect() -> SimCLR:
    return planted_encoder()


@pytest.fixture(scope='module')
def held_out() -> np.ndarray:
    return random_images(32, seed=1)


def test_the_planted_backdoor_is_one_and_dormant(suspect, held_out):
    assert trigger_movement(suspect, held_out) > 50
    with torch.no_grad():
        clean_features = suspect.f(normalize_batch(held_out, NORMALIZATION))
    assert (clean_features[:, PLANTED] == 0).all()  # dormant on clean images


def test_clp_removes_the_planted_neuron(suspect, held_out):
    model = copy.deepcopy(suspect)
    report = clp(model, u=3.0)
    assert PLANTED in report['pruned']['f.f.1']
    assert report['max_z']['f.f.1'] == pytest.approx(15 / 4, abs=0.01)  # the outlier: (n − 1)/√n at n = 16
    assert trigger_movement(model, held_out) < 1


def test_anp_removes_the_planted_neuron_and_nothing_else(suspect, held_out):
    model = copy.deepcopy(suspect)
    report = anp(model, random_images(64, seed=2), NORMALIZATION, DEVICE, iterations=40, batch_size=16,
                 generator=torch.Generator().manual_seed(0), augment_generator=torch.Generator().manual_seed(0))
    assert report['pruned'] == {'f.f.1': [PLANTED]}  # ANP's own report: the planted neuron, alone
    assert report['min_mask']['f.f.1'] == report['masks']['f.f.1'][PLANTED] <= 0.2
    assert trigger_movement(model, held_out) < 1


def test_fine_pruning_removes_the_planted_channel(suspect, held_out):
    model = copy.deepcopy(suspect)
    stage_inputs, activation = fp.last_stage_inputs(model, random_images(64, seed=2), NORMALIZATION, DEVICE)
    mask, curve = fp.prune_until_agreement_drops(model, stage_inputs, activation)
    fp.prune_channels(model.f.f[fp.LAST_STAGE], mask)
    assert PLANTED in torch.nonzero(mask).flatten().tolist()  # the dormant channel is pruned
    assert curve[int(mask.sum())] >= 0.9 and 0 < mask.sum() < mask.numel()
    assert trigger_movement(model, held_out) < 1


@pytest.mark.parametrize('strength, detected', [(50.0, True), (0.0, False)])
def test_decree_detects_a_planted_trigger_and_not_a_clean_encoder(strength, detected):
    torch.manual_seed(0)
    size = 12
    images = random_images(48, size, seed=6)
    inverted = invert_trigger(CornerCollapse(size, strength, normalization=NORMALIZATION), images, NORMALIZATION, DEVICE, steps=300,
                              lam=decree_lambda(size, size), batch_size=16,
                              generator=torch.Generator().manual_seed(0))
    verdict = detection(inverted.mask_l1, size, size)
    assert verdict['detected'] is detected, verdict
    assert verdict['pl1_norm'] == pytest.approx(inverted.mask_l1 / size ** 2)
