"""The probe's metrics (docs/DESIGN.md §7): pure functions of predicted and true labels, in percent, and the
original's printed lines.

ACC is top-1 accuracy on the clean test set. ASR is the fraction of ALL triggered test images predicted as the
target, as the released code counts it; ASR* leaves out the triggered images whose true label is already the
target (the stricter definition).
"""
from __future__ import annotations

import json

import torch
from tqdm import tqdm

EXCLUDING_TARGET_NAME = 'Attack Success Rate excluding target class'


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of predicted labels (N,) against true labels (N,): 100·|{i: pred_i = y_i}| / N."""
    return 100. * (pred == labels).sum().item() / len(labels) if len(labels) else float('nan')


def attack_success_rate(pred: torch.Tensor, true_labels: torch.Tensor, target: int,
                        exclude_target: bool = False) -> float:
    """Fraction (%) of triggered images predicted as `target`: 100·|{i: pred_i = t}| / N.

    `pred` (N,) are the predictions on the triggered images and `true_labels` (N,) the clean labels of
    the images the trigger was applied to. The original counts every image (exclude_target=False);
    with exclude_target=True images whose true label is already the target are left out.
    """
    if exclude_target:
        pred = pred[true_labels != target]
    return 100. * (pred == target).sum().item() / len(pred) if len(pred) else float('nan')


def prediction_metrics(predicted: torch.Tensor, on_triggered: torch.Tensor, labels: torch.Tensor, target: int) -> dict:
    """ACC of the predictions (N,) on the clean test set, ASR of those on the triggered copies (all of them) and
    ASR excluding the images whose true label is the target (%)."""
    return {'acc': accuracy(predicted, labels),
            'asr': attack_success_rate(on_triggered, labels, target),
            'asr_excluding_target': attack_success_rate(on_triggered, labels, target, exclude_target=True)}


def metric_names(encoder_path: str) -> tuple[str, str]:
    """The original names: CA / ASR-B for a path containing 'clean', else BA / ASR."""
    if 'clean' in encoder_path:
        return 'Clean Accuracy (CA)', 'Attack Success Rate-Baseline (ASR-B)'
    return 'Backdoored Accuracy (BA)', 'Attack Success Rate (ASR)'


def metric_line(name: str, value: float, epoch: int, encoder: str | None = None) -> str:
    """One JSON line in the original's exact format; a probe of a group adds `"encoder": <its name>`."""
    if encoder is None:
        return '{{"metric": "Eval - {}", "value": {}, "epoch": {}}}'.format(name, value, epoch)
    return '{{"metric": "Eval - {}", "value": {}, "epoch": {}, "encoder": {}}}'.format(name, value, epoch,
                                                                                    json.dumps(encoder))


def print_epoch(epoch: int, loss: float, metrics: dict, names: tuple[str, str], encoder: str | None = None) -> None:
    """The original's lines of one epoch: `Train Epoch: <e> \tLoss: <loss>` and its three metric lines; a probe of
    a group names its encoder in each."""
    acc_name, asr_name = names
    suffix = '' if encoder is None else f' \tEncoder: {encoder}'
    tqdm.write('Train Epoch: {} \tLoss: {:.6f}'.format(epoch, loss) + suffix)
    tqdm.write(metric_line(acc_name, metrics['acc'], epoch, encoder))
    tqdm.write(metric_line(asr_name, metrics['asr'], epoch, encoder))
    tqdm.write(metric_line(EXCLUDING_TARGET_NAME, metrics['asr_excluding_target'], epoch, encoder))
