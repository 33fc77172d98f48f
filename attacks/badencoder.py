"""BadEncoder (Jia et al., IEEE S&P 2022): its shadow set, its step and objective, and the attack interface every
attack trained by `train_badencoder.py` shares (docs/DESIGN.md §5).

The encoder f (initialised from the clean encoder f0) is fine-tuned so that
    L0 = −(1/R) Σ_i mean_x cos(f(x ⊕ t_i), f(r_i))          triggered shadow images map to reference i
    L1 = −(1/R) Σ_i mean_batch cos(f(aug(r_i)), f0(r_i))     the references stay where f0 put them
    L2 = −mean_x cos(f(x), f0(x))                            clean images keep their clean features
    L  = L0 + λ1·L1 + λ2·L2
is minimised over the shadow set; only f is trained, every BatchNorm of f stays in eval mode.

An attack is a class with BadEncoder's interface (`BadEncoder` below; `attacks.drupe.Drupe`): the log columns,
the triggered copies per image, the step objective of an epoch, what it does after an epoch, the keys it adds to
a checkpoint, how it restores them, and what it says at the end. The stage-1 driver calls these and has no
per-attack branch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import distributed
from common.cli import data_dir_for, progress_disabled
from common.engine import train_steps
from core import processes
from core.device import autocast
from core.errors import DataError, UsageError
from datasets import (Reference, ShadowImages, Trigger, apply_trigger, get_info, load_images, load_reference,
                      load_split, load_trigger, normalize_batch, triggered_copy)
from datasets.registry import split_path
from evaluation.features import encode_images, knn_accuracies
from models.losses import negative_cosine

# BadEncoder's shadow set: all of CIFAR10's train split; for STL10 the *first* 50000 of its 100000 unlabeled images
# (the released code's np.random.seed(100); np.random.choice(50000, 50000, replace=False) only permutes indices
# 0..49999, and the loader shuffles each epoch anyway, so the order does not matter).
SHADOW_SIZE = 50000
SHADOW_SUBSET_SEED = 100  # the fixed numpy seed of DRUPE's --shadow_fraction subset (independent of --seed)
LOG_COLUMNS = ('epoch', 'loss', 'loss0', 'loss1', 'loss2', 'knn_acc', 'knn_asr')


def fix_readme_typo(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept the original README's `--pretrained_encoder --PATH`.

    When the token after --pretrained_encoder starts with '--' and is no option of `parser`, it is taken
    as the value; its leading '--' is dropped only when no file has the name as written but the stripped
    path exists.
    """
    argv = list(argv)
    known = list(parser._option_string_actions)
    for i, token in enumerate(argv[:-1]):
        value = argv[i + 1]
        if token != '--pretrained_encoder' or not value.startswith('--') or len(value) <= 2:
            continue
        name = value.split('=', 1)[0]
        if any(option.startswith(name) for option in known):  # an option, or an abbreviation argparse accepts
            break
        if not Path(value).exists() and Path(value[2:]).exists():
            value = value[2:]
        print(f"note: took '{argv[i + 1]}' after --pretrained_encoder as its value (the original README's "
              f"form), using '{value}'", file=sys.stderr)
        argv[i:i + 2] = [f'--pretrained_encoder={value}']
        break
    return argv


def fixed_subset(images: np.ndarray, size: int) -> np.ndarray:
    """`size` of the images, drawn without replacement by a fixed generator (SHADOW_SUBSET_SEED, whatever --seed
    is), in their original order."""
    keep = np.random.default_rng(SHADOW_SUBSET_SEED).permutation(len(images))[:size]
    return images[np.sort(keep)]


def load_shadow_images(args: argparse.Namespace, image_size: int | None = None) -> np.ndarray:
    """The shadow set: the first SHADOW_SIZE images of --shadow_dataset's pre-training split (all of CIFAR10's,
    the first 50000 of STL10's unlabeled, as the released code), of which a fixed --shadow_fraction is kept
    (DRUPE: 20%; its code draws them with --seed, 100 by default). See docs/DESIGN.md §5.2. `image_size`: a
    real-world encoder's input (224): the images at that size, from an npz (cifar10_224 as prepared, or resized
    here) or an image folder given as --data_dir (docs/DESIGN.md §2.6)."""
    info = get_info(args.shadow_dataset)
    data_dir = data_dir_for(args, args.shadow_dataset)
    if image_size is None:
        images, _ = load_split(args.shadow_dataset, info.pretraining_split, data_dir)
    else:
        images = load_images(args.shadow_dataset, info.pretraining_split, data_dir, image_size)
    images = images[:SHADOW_SIZE]  # STL10: 50000 of its 100000 unlabeled images
    if args.shadow_fraction < 1:
        images = fixed_subset(images, int(args.shadow_fraction * len(images)))
    if len(images) < args.batch_size:
        raise UsageError(f'--batch_size {args.batch_size} is larger than the shadow set ({len(images)} images '
                         f'of {args.shadow_dataset}/{info.pretraining_split}); every batch is dropped')
    return images


def first_references(reference: Reference, count: int | None, path: str) -> Reference:
    """The first `count` references of the file at `path` (all of them when None)."""
    if count is None:
        return reference
    if count > len(reference):
        raise DataError(f'{path}: holds {len(reference)} reference(s), --num_references asks for {count}')
    return Reference(reference.x[:count], reference.y[:count], reference.info)


def load_attack_files(args: argparse.Namespace, image_size: int, resize_references: bool = False,
                      ) -> tuple[Trigger, Reference]:
    """The trigger (of the shadow images' size) and the references (of that size, or resized to it with
    `resize_references`, a real-world encoder's 224-px input)."""
    trigger = load_trigger(args.trigger_file, image_size)
    reference = load_reference(args.reference_file, get_info(args.downstreamTask).num_classes, image_size,
                               resize_to=image_size if resize_references else None)
    reference = first_references(reference, args.num_references, args.reference_file)
    if 1 < len(trigger) < len(reference):
        raise DataError(f'{args.trigger_file}: holds {len(trigger)} trigger patches but {args.reference_file} '
                        f'holds {len(reference)} references; give one patch, or one per reference')
    return trigger, reference


@dataclass
class MonitorData:
    """The downstream task's kNN memory bank, its test set and the triggered test set: the monitor of
    docs/DESIGN.md §5.4."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    triggered_x: np.ndarray
    target_label: int
    num_classes: int


def load_monitor_data(args: argparse.Namespace, trigger: Trigger, target_label: int) -> MonitorData | None:
    """The monitor's data when --downstreamTask is prepared, else None (with a one-line notice)."""
    name = args.downstreamTask
    folder = data_dir_for(args, name, primary=False)
    missing = [str(split_path(name, split, folder)) for split in ('train', 'test')
               if not split_path(name, split, folder).is_file()]
    if missing:
        print(f'note: {name} is not prepared ({missing[0]} missing); the kNN accuracy / attack-success monitor '
              'is skipped', file=sys.stderr)
        return None
    info = get_info(name)
    if info.image_size != trigger.image_size:
        print(f'note: {name} images are {info.image_size}x{info.image_size}, the trigger is '
              f'{trigger.image_size}x{trigger.image_size}; the monitor is skipped', file=sys.stderr)
        return None
    train_x, train_y = load_split(name, 'train', folder)
    test_x, test_y = load_split(name, 'test', folder)
    return MonitorData(train_x, train_y, test_x, test_y, triggered_copy(test_x, trigger, 0), target_label,
                       info.num_classes)


@torch.no_grad()
def evaluate_backdoor(encoder: nn.Module, monitor: MonitorData, normalization, args: argparse.Namespace,
                      device: torch.device) -> dict[str, float]:
    """kNN accuracy (%) on the downstream test set and the % of triggered test images sent to the target.

    The memory bank (the downstream train set) is encoded once for both.
    """
    target = np.full(len(monitor.triggered_x), monitor.target_label)
    accuracy, attack_success = knn_accuracies(encoder, (monitor.train_x, monitor.train_y),
                                              [(monitor.test_x, monitor.test_y), (monitor.triggered_x, target)],
                                              normalization, monitor.num_classes, args.knn_k, args.knn_t, device,
                                              progress_disabled(args))
    return {'knn_acc': accuracy, 'knn_asr': attack_success}


class IndexedShadow(ShadowImages):
    """ShadowImages whose items are (index, augmented references (R, 3, H, W)).

    Only the reference augmentation is random, so only it runs per item (PIL, in the loader workers).
    The clean and triggered images are un-augmented: the training step builds them for a whole batch
    on the device from the uint8 shadow images and the index (`normalize_batch`, the same arithmetic
    as the test transform), and the index also looks up the cached f0(x).
    """

    def __getitem__(self, index: int):
        return index, torch.stack([self.reference_transform(r) for r in self.reference_images])


@torch.no_grad()
def clean_encoder_features(clean_encoder: nn.Module, shadow_images: np.ndarray, reference_images: np.ndarray,
                           normalization, device: torch.device, disable_progress: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised f0(x) (N, d) of the shadow set and f0(r_i) (R, d) of the references, on `device`."""
    clean_encoder.eval().to(device)
    shadow = encode_images(clean_encoder, shadow_images, normalization, device, desc='f0(shadow set)',
                           disable_progress=disable_progress)
    return shadow, encode_images(clean_encoder, reference_images, normalization, device,
                                 desc='f0(references)', disable_progress=disable_progress)


def freeze_batchnorm(encoder: nn.Module) -> None:
    """Every BatchNorm in eval mode (running statistics fixed) with its affine parameters frozen.

    `module.train()` puts BatchNorm back into training mode, so call this after every `.train()`.
    """
    for module in encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)


def triggered_inputs(images: torch.Tensor, trigger: Trigger, num_copies: int,
                     trigger_index, normalization) -> torch.Tensor:
    """(C·B, 3, H, W): the batch (B, H, W, 3) uint8 with trigger `trigger_index(c)` applied to copy c, c-major."""
    copies = [apply_trigger(images, trigger, trigger_index(c)) for c in range(num_copies)]
    return normalize_batch(torch.cat(copies), normalization)


@dataclass
class StepFeatures:
    """One step's features of f (raw, as the encoder returns them) and the frozen f0's targets (normalised)."""
    clean: torch.Tensor  # (B, d) f(x)
    triggered: torch.Tensor  # (C, B, d) f(x ⊕ t_c): C = R copies, or 1 (see BadEncoder.copies, Drupe.copies)
    augmented: torch.Tensor  # (R, B, d) f(aug(r_i)), a fresh augmentation per batch element
    reference: torch.Tensor  # (R, d) f(r_i)
    clean_target: torch.Tensor  # (B, d) f0(x)
    reference_target: torch.Tensor  # (R, d) f0(r_i)


def global_batch(features: StepFeatures) -> StepFeatures:
    """The step's features of the global batch: this process's own in one process; under torchrun each
    per-sample field gathered from every process in rank order, with its gradients (the references' are the
    same in every process). Every process then evaluates the objective of the global batch: the backward pass of
    the gather sums each process's W identical losses back to its own samples, and DistributedDataParallel's
    average over the W processes leaves the gradient of one process on the whole batch."""
    if processes.world_size() == 1:
        return features
    return StepFeatures(clean=distributed.gather(features.clean),
                        triggered=distributed.gather(features.triggered, dim=1),
                        augmented=distributed.gather(features.augmented, dim=1),
                        reference=features.reference,
                        clean_target=distributed.gather(features.clean_target),
                        reference_target=features.reference_target)


def badencoder_effectiveness(features: StepFeatures) -> torch.Tensor:
    """L0 = −(1/R) Σ_i mean_b cos(f(x_b ⊕ t_i), f(r_i)) (docs/DESIGN.md §5.1), one triggered copy per reference.

    Each reference pairs with the same number (B) of samples, so the mean over all R·B pairs is (1/R) Σ_i mean_b.
    """
    batch = features.clean.shape[0]
    return negative_cosine(features.triggered.flatten(0, 1), features.reference.repeat_interleave(batch, dim=0))


def utility_terms(features: StepFeatures) -> dict[str, torch.Tensor]:
    """L1 = −(1/R) Σ_i mean_b cos(f(aug(r_i)), f0(r_i)) and L2 = −mean_b cos(f(x_b), f0(x_b))
    (docs/DESIGN.md §5.1)."""
    batch = features.clean.shape[0]
    return {'loss1': negative_cosine(features.augmented.flatten(0, 1),
                                     features.reference_target.repeat_interleave(batch, dim=0)),
            'loss2': negative_cosine(features.clean, features.clean_target)}


def badencoder_objective(features: StepFeatures, lambda1: float, lambda2: float
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L = L0 + λ1·L1 + λ2·L2, the terms) of docs/DESIGN.md §5.1."""
    terms = {'loss0': badencoder_effectiveness(features), **utility_terms(features)}
    return terms['loss0'] + lambda1 * terms['loss1'] + lambda2 * terms['loss2'], terms


def train_one_epoch(encoder: nn.Module, loader, shadow: torch.Tensor, clean_features: torch.Tensor,
                    references: torch.Tensor, clean_reference_features: torch.Tensor, trigger: Trigger,
                    trigger_index, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    normalization, device: torch.device, epoch: int, objective=None,
                    num_copies: int | None = None) -> dict[str, float]:
    """One pass over the shadow set; returns the mean loss and terms.

    shadow (N, H, W, 3) uint8 and clean_features (N, d) = normalised f0(x) live on `device`;
    references (R, 3, H, W) are the normalised un-augmented r_i, clean_reference_features (R, d) = f0(r_i).
    `objective` maps a step's StepFeatures to (loss, terms) (default: BadEncoder's with --lambda1/2);
    `num_copies` is the triggered copies per image (default: R, one per reference).
    """
    num_references = len(references)
    objective = objective or partial(badencoder_objective, lambda1=args.lambda1, lambda2=args.lambda2)
    num_copies = num_copies or num_references

    def step_loss(indices: torch.Tensor, augmented: torch.Tensor):
        batch = len(indices)
        images = shadow[indices]  # (B, H, W, 3) uint8
        clean = normalize_batch(images, normalization)  # (B, 3, H, W)
        triggered = triggered_inputs(images, trigger, num_copies, trigger_index, normalization)  # (C·B, 3, H, W)
        augmented = augmented.transpose(0, 1).flatten(0, 1)  # (R·B, 3, H, W)
        # Triggered copies and augmented references are both i-major (reference i's B samples together).
        # One forward of f for everything it sees this step: every BatchNorm of f is in eval mode, so a
        # sample's feature does not depend on what else is in the batch, and batching changes nothing.
        with autocast(device, args.amp):
            features = encoder(torch.cat([clean, triggered, augmented, references])).float()
        f_clean, f_triggered, f_augmented, f_reference = features.split(
            [batch, num_copies * batch, num_references * batch, num_references])
        return objective(global_batch(StepFeatures(
            f_clean, f_triggered.view(num_copies, batch, -1), f_augmented.view(num_references, batch, -1),
            f_reference, clean_features[indices], clean_reference_features)))

    encoder.train()
    freeze_batchnorm(encoder)
    return train_steps(loader, optimizer, step_loss, epoch=epoch, device=device,
                       desc=f'Train {epoch}/{args.epochs}', disable_progress=progress_disabled(args))


class BadEncoder:
    """The attack interface of `train_badencoder.py`, with BadEncoder's behaviour: its objective, R triggered
    copies per image, nothing after an epoch, no checkpoint keys of its own."""
    columns = LOG_COLUMNS

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device

    @staticmethod
    def flag_defaults() -> dict:
        """The attack's values of the flags a command line leaves out (none: the parser's defaults are BadEncoder's)."""
        return {}

    def copies(self, num_references: int, num_patches: int) -> int:
        """Triggered copies per shadow image: one per reference (R identical copies when they share a patch)."""
        return num_references

    def objective(self, epoch: int):
        """The step loss of `epoch`: StepFeatures -> (loss, terms)."""
        return partial(badencoder_objective, lambda1=self.args.lambda1, lambda2=self.args.lambda2)

    def start(self, results_dir: Path) -> None:
        """A fresh run (not a resumed one) is about to train."""

    def after_epoch(self, epoch: int, losses: dict[str, float], model: nn.Module,
                    optimizer: torch.optim.Optimizer, results_dir: Path, target_label: int) -> dict[str, float]:
        """What the epoch's log row adds to its losses."""
        return {}

    def checkpoint_keys(self, epoch: int, model: nn.Module) -> dict:
        """The keys the attack adds to (or overrides in) the checkpoint of `epoch`."""
        return {}

    def restore(self, checkpoint: dict) -> None:
        """Take the attack's state back from a checkpoint its `checkpoint_keys` wrote."""

    def describe_output(self) -> str | None:
        """A line on the attack's output, printed at the end; None: nothing to say."""
        return None
