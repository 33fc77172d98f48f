"""Why datasets.prepare writes a class-sorted split in a fixed random order: the stage-3 probe iterates its
training features in a fixed order (as the original), so a file sorted by class (GTSRB as torchvision reads
it) trains it class after class, and what it predicts depends on where each class sits in the file.

The probe here is training_downstream_classifier's own (MLPProbe 512-256, Adam lr 1e-4, batch 64,
`train_one_epoch` in fixed order) on fixed features shaped like an encoder's: L2-normalised, 10 overlapping
classes of 1280 each (20 batches per class; GTSRB's training split averages about 14 per class). Trained on
the sorted copy, its predictions on a balanced test set pile up in the later classes and its accuracy drops;
trained on the same data in prepare's fixed random order, they spread evenly. Seen with this code (data
seeds 0..3, the test uses 0): share of predictions in classes 5..9 0.84 / 0.70 / 0.90 / 0.73 sorted against
0.48-0.52 shuffled; accuracy 0.26-0.31 against 0.39-0.44. The pile-up is in the upper half of the labels,
not on the very last class, which stays rare. About 20 s on one busy CPU core.
"""
from __future__ import annotations

import numpy as np
import torch

from datasets.prepare import class_sorted, fixed_order
from models import MLPProbe
from evaluation.probe import predict
from models.probe_group import OneProbe
from common.probes import train_one_epoch

CLASSES, PER_CLASS, DIM, NOISE = 10, 1280, 32, 0.8
EPOCHS, LR, BATCH = 10, 1e-4, 64  # the probe's learning rate and batch size (docs/DESIGN.md §7)


def encoder_like_features(per_class: int, seed: int, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features (N, DIM) around one unit mean per class, sorted by class, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    features = means[labels] + NOISE * rng.standard_normal((len(labels), DIM))
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32), labels


def trained_probe_predictions(features: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    torch.manual_seed(0)  # the same initialisation and dropout masks for both orders
    probe = MLPProbe(DIM, (512, 256), CLASSES)
    optimizer = torch.optim.Adam(probe.parameters(), lr=LR)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    for epoch in range(1, EPOCHS + 1):
        train_one_epoch(OneProbe(probe), optimizer, x[None], y, BATCH, epoch)
    return predict(OneProbe(probe), torch.from_numpy(test)[None])[0].numpy()


def test_a_class_sorted_training_file_biases_the_fixed_order_probe_towards_later_classes():
    means = np.random.default_rng(0).standard_normal((CLASSES, DIM))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sorted_x, sorted_y = encoder_like_features(PER_CLASS, seed=100, means=means)
    test_x, test_y = encoder_like_features(100, seed=200, means=means)  # balanced: 100 per class
    shuffled_x, shuffled_y, order = fixed_order(sorted_x, sorted_y, seed=0)  # what prepare writes
    assert class_sorted(sorted_y) and order is not None and not class_sorted(shuffled_y)

    outcome = {}
    for name, (x, y) in {'sorted': (sorted_x, sorted_y), 'shuffled': (shuffled_x, shuffled_y)}.items():
        predicted = trained_probe_predictions(x, y, test_x)
        outcome[name] = {'later_half': float(np.mean(predicted >= CLASSES // 2)),
                         'accuracy': float(np.mean(predicted == test_y)),
                         'counts': np.bincount(predicted, minlength=CLASSES).tolist()}
    # balanced predictions put about half in classes 5..9; the sorted file's pile up there (seen: 0.84 vs 0.51)
    assert 0.35 <= outcome['shuffled']['later_half'] <= 0.65, outcome
    assert outcome['sorted']['later_half'] >= outcome['shuffled']['later_half'] + 0.2, outcome
    # and cost accuracy (seen: 0.29 vs 0.40)
    assert outcome['sorted']['accuracy'] <= outcome['shuffled']['accuracy'] - 0.05, outcome
