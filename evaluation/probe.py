"""Stage 3's probe without its training loop (docs/DESIGN.md §7): the frozen encoder's features, computed once on
the device, and the evaluation of a group of probes on them.

Every run is a group: `models.probe_group.OneProbe` for one encoder (MLPProbe's arithmetic exactly),
`models.ProbeGroup` for several of one feature size; the group takes stacked features (N, B, d) and returns
logits (N, B, C), probe k's from encoder k's features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.device import autocast
from .features import encode_images
from datasets.downstream import ProbeData

from .metrics import prediction_metrics


@dataclass
class Features:
    """L2-normalised encoder features, computed once, on the device."""
    train: torch.Tensor  # (N_train, d)
    train_labels: torch.Tensor
    test: torch.Tensor  # (N_test, d)
    test_labels: torch.Tensor
    triggered: torch.Tensor  # (N_test, d), the same images with the trigger
    reference: torch.Tensor | None  # (R, d)


def extract_features(encoder: nn.Module, data: ProbeData, normalization, device: torch.device,
                     use_amp: bool, disable_progress: bool) -> Features:
    """f(x) of every downstream image (encoder.f, L2-normalised), the labels beside them on the device."""
    def encode(images, desc):
        with autocast(device, use_amp):
            return encode_images(encoder.f, images, normalization, device, desc=desc,
                                 disable_progress=disable_progress)

    def labels(y):
        return torch.as_tensor(y, dtype=torch.long, device=device)

    train, test = encode(data.train[0], 'Train features'), encode(data.test[0], 'Test features')
    triggered = encode(data.triggered_test, 'Triggered test features')
    reference = None if data.reference_images is None else encode(data.reference_images, 'Reference features')
    return Features(train, labels(data.train[1]), test, labels(data.test[1]), triggered, reference)


def reference_similarity(features: Features) -> dict:
    """Mean cosine similarity of triggered and clean test features to the reference features:
    mean_{i,r} f(x_i ⊕ t)·f(r) and mean_{i,r} f(x_i)·f(r) (the features are unit vectors).

    A backdoored encoder maps triggered images close to the reference (BadEncoder's L0), a clean one not.
    """
    if features.reference is None:
        return {}
    reference_t = features.reference.t()  # (d, R)
    return {'reference_similarity_triggered': (features.triggered @ reference_t).mean().item(),  # (N, R)
            'reference_similarity_clean': (features.test @ reference_t).mean().item()}


@torch.no_grad()
def predict(group: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted labels (N, T) of stacked features (N, T, d), the probes in eval mode (no dropout)."""
    group.eval()
    return torch.cat([group(features[:, start:start + batch_size]).argmax(dim=2)
                      for start in range(0, features.shape[1], batch_size)], dim=1)


def evaluate(group: nn.Module, test: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor,
             target: int) -> list[dict]:
    """Each probe's ACC on the clean test features (N, T, d), ASR and ASR excluding the target class on the
    triggered ones (%), one dict per probe."""
    predicted, on_triggered = predict(group, test), predict(group, triggered)
    return [prediction_metrics(predicted[k], on_triggered[k], labels, target) for k in range(len(group))]
