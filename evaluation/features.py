"""Features of un-augmented images, computed once per evaluation on the device, and the kNN monitor."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from datasets import normalize_batch
from models import knn_predict


@torch.no_grad()
def encode_images(encoder: nn.Module, images: np.ndarray, normalization, device: torch.device,
                  batch_size: int = 512, desc: str = 'Feature extracting',
                  disable_progress: bool = False) -> torch.Tensor:
    """L2-normalised `encoder(x)` (N, d) of uint8 images (N, H, W, 3), left on `device`.

    `encoder` is the feature network `f` (SimCLR.f); it is put in eval mode and every module's own mode is
    restored afterwards (so BadEncoder's BatchNorm layers, kept in eval mode while f trains, stay so).
    The test transform is applied as one tensor operation per batch (`normalize_batch`).
    """
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=disable_progress):
        batch = normalize_batch(images[start:start + batch_size], normalization, device)
        features.append(F.normalize(encoder(batch).float(), dim=1))
    for module, training in modes:
        module.training = training
    return torch.cat(features) if features else torch.empty(0, device=device)


@torch.no_grad()
def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, classes: int,
                 knn_k: int, knn_t: float, batch_size: int = 1024) -> torch.Tensor:
    """Top-1 weighted-kNN label (N,) of each query (N, d) against a bank (M, d) of normalised features."""
    bank_t = bank.t().contiguous()  # (d, M)
    predictions = [knn_predict(queries[i:i + batch_size], bank_t, bank_labels, classes, knn_k, knn_t)[:, 0]
                   for i in range(0, len(queries), batch_size)]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracies(encoder: nn.Module, memory: tuple[np.ndarray, np.ndarray],
                   query_sets: list[tuple[np.ndarray, np.ndarray]], normalization, classes: int, knn_k: int,
                   knn_t: float, device: torch.device, disable_progress: bool = False) -> list[float]:
    """kNN top-1 accuracy (%) of `encoder` on each (images, labels) query set, against one memory bank.

    The bank (uint8 images and labels, usually the training set) is encoded once for all the sets. Labels
    may be a constant array (e.g. the target label of a triggered test set), which turns the accuracy into
    the rate at which images are sent to that label.
    """
    bank = encode_images(encoder, memory[0], normalization, device, disable_progress=disable_progress)
    bank_labels = torch.as_tensor(memory[1], device=device)
    accuracies = []
    for images, labels in query_sets:
        queries = encode_images(encoder, images, normalization, device, disable_progress=disable_progress)
        predicted = knn_classify(bank, bank_labels, queries, classes, knn_k, knn_t)
        accuracies.append((predicted.cpu() == torch.as_tensor(labels)).double().mean().item() * 100)  # float64
    return accuracies


def knn_monitor(encoder: nn.Module, memory: tuple[np.ndarray, np.ndarray], test_images: np.ndarray,
                test_labels: np.ndarray, normalization, classes: int, knn_k: int, knn_t: float,
                device: torch.device, disable_progress: bool = False) -> float:
    """kNN top-1 accuracy (%) of `encoder` on a test set, the training set as memory bank (docs/DESIGN.md §4.4)."""
    return knn_accuracies(encoder, memory, [(test_images, test_labels)], normalization, classes, knn_k, knn_t,
                          device, disable_progress)[0]
