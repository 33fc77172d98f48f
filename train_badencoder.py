"""Stage 1 — BadEncoder (Jia et al., S&P 2022): plant a backdoor in a clean SimCLR encoder (SPEC §5).

The encoder f (initialised from the clean encoder f0) is fine-tuned so that
    L0 = −(1/R) Σ_i mean_x cos(f(x ⊕ t_i), f(r_i))          triggered shadow images map to reference i
    L1 = −(1/R) Σ_i mean_batch cos(f(aug(r_i)), f0(r_i))     the references stay where f0 put them
    L2 = −mean_x cos(f(x), f0(x))                            clean images keep their clean features
    L  = L0 + λ1·L1 + λ2·L2
is minimised over the shadow set; only f is trained, every BatchNorm of f stays in eval mode.

The paper's run (CIFAR10 encoder, GTSRB target "priority road"), as in the original README:

    python train_badencoder.py --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --reference_file reference/cifar10/priority.npz --pretraining_dataset cifar10 --downstreamTask gtsrb \
        --pretrained_encoder --runs/clean/model_1000.pth --results_dir runs/backdoor

(the README's `--pretrained_encoder --PATH` typo is accepted as written). The offline pipeline on the
project's synthetic sets, with a small encoder (each stage about a minute per epoch on two CPU cores):

    python -m datasets.prepare synthetic_shapes synthetic_digits
    python reference/make_reference.py --dataset synthetic_digits --class_id 1 --first 1 \
        --out reference/synthetic_shapes/one.npz
    python train_clean_encoder.py --pretraining_dataset synthetic_shapes --width 8 --epochs 20 \
        --results_dir runs/clean_synthetic
    python train_badencoder.py --pretraining_dataset synthetic_shapes --shadow_dataset synthetic_shapes \
        --encoder_usage_info synthetic_shapes --downstreamTask synthetic_digits --epochs 10 \
        --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --reference_file reference/synthetic_shapes/one.npz \
        --pretrained_encoder runs/clean_synthetic/model_20.pth --results_dir runs/backdoor_synthetic

Writes args.json, log.csv (epoch, loss, loss0, loss1, loss2, knn_acc, knn_asr) and model_<epoch>.pth every
--save_freq epochs and at the end; --resume continues from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.cli import (StageParser, UsageError, autocast, check_finite, data_dir_for, print_args,
                        progress_disabled, require_positive, resolve_device, run_main, seed_everything,
                        shared_parser)
from common.fastpath import add_speed_arguments, maybe_compile, shadow_batches, to_channels_last
from common.features import encode_images, knn_accuracies
from common.runs import (check_resumable, is_save_epoch, prepare_results_dir, read_csv,
                         restore_optimizer, resume_state, save_run_checkpoint, write_csv, write_json)
from datasets import (DATASETS, DataError, Reference, ShadowImages, Trigger, apply_trigger, finetune_transform,
                      get_info, load_reference, load_split, load_trigger, normalize_batch, pretraining_names,
                      split_path, test_transform, triggered_copy)
from models import SimCLR, load_encoder
from models.checkpoint import load_state_into
from models.losses import negative_cosine

CHECKPOINT_PATTERN = 'model_{}.pth'
# Flags that shape the trajectory of a run: a resumed run must be given the same values.
RESUME_MUST_MATCH = ('shadow_dataset', 'encoder_usage_info', 'pretrained_encoder', 'trigger_file', 'reference_file',
                     'seed', 'lr', 'batch_size', 'lambda1', 'lambda2', 'num_workers', 'augment')
SHADOW_SIZE = 50000  # BadEncoder's shadow set: all of CIFAR10's train split, 50000 images of STL10's unlabeled
SHADOW_SUBSET_SEED = 100  # the fixed numpy seed of that subset (independent of --seed)
LOG_COLUMNS = ('epoch', 'loss', 'loss0', 'loss1', 'loss2', 'knn_acc', 'knn_asr')


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='Plant a BadEncoder backdoor in a pre-trained SimCLR encoder (stage 1).',
                         parents=[shared_parser()])
    parser.add_argument('--batch_size', default=256, type=int, help='shadow images per step (default: 256)')
    parser.add_argument('--lr', default=0.001, type=float, help='SGD learning rate (default: 0.001)')
    parser.add_argument('--lambda1', default=1.0, type=float,
                        help='weight of L1, the reference-stays-put loss (default: 1.0)')
    parser.add_argument('--lambda2', default=1.0, type=float,
                        help='weight of L2, the clean-features-stay-put loss (default: 1.0)')
    parser.add_argument('--epochs', default=200, type=int, help='passes over the shadow set (default: 200)')
    parser.add_argument('--reference_file', default='', type=str, metavar='PATH',
                        help='npz with the reference inputs x and their target labels y; y[0] is the target')
    parser.add_argument('--trigger_file', default='', type=str, metavar='PATH',
                        help='npz with the trigger patches t and masks tm')
    parser.add_argument('--pretraining_dataset', default='cifar10', choices=pretraining_names(),
                        help='the set the clean encoder was pre-trained on; recorded in args.json only, the '
                             'normalisation comes from --encoder_usage_info (default: cifar10)')
    parser.add_argument('--shadow_dataset', default='cifar10', choices=sorted(DATASETS),
                        help="the attacker's shadow data: that set's pre-training split, at most "
                             f'{SHADOW_SIZE} images (default: cifar10)')
    parser.add_argument('--downstreamTask', default='cifar10', choices=sorted(DATASETS),
                        help="the target downstream task: the reference labels must be among its classes; "
                             'when prepared, its kNN accuracy and attack success are monitored (default: cifar10)')
    parser.add_argument('--pretrained_encoder', default='', type=str, metavar='PATH',
                        help='the clean encoder checkpoint to backdoor (loaded with weights_only=True)')
    parser.add_argument('--encoder_usage_info', default='cifar10', choices=pretraining_names(),
                        help="the encoder's pre-training set, which fixes the normalisation (default: cifar10)")
    parser.add_argument('--knn-k', dest='knn_k', default=200, type=int,
                        help='neighbours of the kNN monitor (default: 200)')
    parser.add_argument('--knn-t', dest='knn_t', default=0.5, type=float,
                        help='temperature of the kNN monitor (default: 0.5)')
    parser.add_argument('--save_freq', default=20, type=int,
                        help='write model_<epoch>.pth every this many epochs, and at the end '
                             '(0: only at the end) (default: 20)')
    add_speed_arguments(parser)
    return parser


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


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, before anything is loaded."""
    for flag in ('pretrained_encoder', 'trigger_file', 'reference_file'):
        if not getattr(args, flag):
            raise UsageError(f'--{flag} is required')
    require_positive('--epochs', args.epochs)
    require_positive('--batch_size', args.batch_size)
    require_positive('--knn-k', args.knn_k)
    if args.save_freq < 0:
        raise UsageError(f'--save_freq must be 0 (only at the end) or positive, got {args.save_freq}')


# ----------------------------------------------------------------------------------------------- data

def load_shadow_images(args: argparse.Namespace) -> np.ndarray:
    """The shadow set: the pre-training split of --shadow_dataset, at most SHADOW_SIZE images (SPEC §5)."""
    info = get_info(args.shadow_dataset)
    images, _ = load_split(args.shadow_dataset, info.pretraining_split, data_dir_for(args, args.shadow_dataset))
    if len(images) > SHADOW_SIZE:  # STL10's 100000 unlabeled images: a fixed subset, whatever --seed is
        keep = np.random.default_rng(SHADOW_SUBSET_SEED).permutation(len(images))[:SHADOW_SIZE]
        images = images[np.sort(keep)]
    if len(images) < args.batch_size:
        raise UsageError(f'--batch_size {args.batch_size} is larger than the shadow set ({len(images)} images '
                         f'of {args.shadow_dataset}/{info.pretraining_split}); every batch is dropped')
    return images


def load_attack_files(args: argparse.Namespace, image_size: int) -> tuple[Trigger, Reference]:
    trigger = load_trigger(args.trigger_file, image_size)
    reference = load_reference(args.reference_file, get_info(args.downstreamTask).num_classes, image_size)
    if 1 < len(trigger) < len(reference):
        raise DataError(f'{args.trigger_file}: holds {len(trigger)} trigger patches but {args.reference_file} '
                        f'holds {len(reference)} references; give one patch, or one per reference')
    return trigger, reference


@dataclass
class MonitorData:
    """The downstream task's kNN memory bank, its test set and the triggered test set (SPEC §5 monitor)."""
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


class IndexedShadow(ShadowImages):
    """ShadowImages whose items are (index, augmented references (R, 3, H, W)).

    Only the reference augmentation is random, so only it runs per item (PIL, in the loader workers).
    The clean and triggered images are un-augmented: the training step builds them for a whole batch
    on the device from the uint8 shadow images and the index (`normalize_batch`, the same arithmetic
    as the test transform), and the index also looks up the cached f0(x).
    """

    def __getitem__(self, index: int):
        return index, torch.stack([self.reference_transform(r) for r in self.reference_images])


# ------------------------------------------------------------------------------------------- training

def freeze_batchnorm(encoder: nn.Module) -> None:
    """Every BatchNorm in eval mode (running statistics fixed) with its affine parameters frozen.

    `module.train()` puts BatchNorm back into training mode, so call this after every `.train()`.
    """
    for module in encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)


def triggered_inputs(images: torch.Tensor, trigger: Trigger, num_references: int,
                     trigger_index, normalization) -> torch.Tensor:
    """(R·B, 3, H, W): the batch (B, H, W, 3) uint8 with trigger i applied for reference i, i-major."""
    copies = [apply_trigger(images, trigger, trigger_index(i)) for i in range(num_references)]
    return normalize_batch(torch.cat(copies), normalization)


def train_one_epoch(encoder: nn.Module, loader, shadow: torch.Tensor, clean_features: torch.Tensor,
                    references: torch.Tensor, clean_reference_features: torch.Tensor, trigger: Trigger,
                    trigger_index, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    normalization, device: torch.device, epoch: int) -> dict[str, float]:
    """One pass over the shadow set; returns the mean loss terms.

    shadow (N, H, W, 3) uint8 and clean_features (N, d) = normalised f0(x) live on `device`;
    references (R, 3, H, W) are the normalised un-augmented r_i, clean_reference_features (R, d) = f0(r_i).
    """
    encoder.train()
    freeze_batchnorm(encoder)
    num_references = len(references)
    totals = {'loss': 0.0, 'loss0': 0.0, 'loss1': 0.0, 'loss2': 0.0}
    bar = tqdm(loader, desc=f'Train {epoch}/{args.epochs}', disable=progress_disabled(args))
    for step, (indices, augmented) in enumerate(bar, start=1):
        indices = indices.to(device, non_blocking=True)
        batch = len(indices)
        images = shadow[indices]  # (B, H, W, 3) uint8
        clean = normalize_batch(images, normalization)  # (B, 3, H, W)
        triggered = triggered_inputs(images, trigger, num_references, trigger_index, normalization)  # (R·B, 3, H, W)
        augmented = augmented.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (R·B, 3, H, W)
        # Triggered copies and augmented references are both i-major (reference i's B samples together).
        # One forward of f for everything it sees this step: every BatchNorm of f is in eval mode, so a
        # sample's feature does not depend on what else is in the batch, and batching changes nothing.
        with autocast(device, args.amp):
            features = encoder(torch.cat([clean, triggered, augmented, references])).float()
        f_clean, f_triggered, f_augmented, f_reference = features.split(
            [batch, num_references * batch, num_references * batch, num_references])
        # Each reference pairs with the same number (B) of samples, so the mean over all R·B pairs is
        # (1/R) Σ_i mean_b of SPEC §5.
        loss0 = negative_cosine(f_triggered, f_reference.repeat_interleave(batch, dim=0))
        loss1 = negative_cosine(f_augmented, clean_reference_features.repeat_interleave(batch, dim=0))
        loss2 = negative_cosine(f_clean, clean_features[indices])
        loss = loss0 + args.lambda1 * loss1 + args.lambda2 * loss2
        check_finite(loss, epoch, step)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        for name, value in zip(totals, (loss, loss0, loss1, loss2)):
            totals[name] += value.item()
        bar.set_postfix({name: f'{total / step:.4f}' for name, total in totals.items()})
    return {name: total / len(loader) for name, total in totals.items()}


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


def log_epoch(rows: list[dict], results_dir: Path, epoch: int, losses: dict | None, metrics: dict | None) -> None:
    row = {column: '' for column in LOG_COLUMNS}
    row.update({'epoch': epoch, **(losses or {}), **(metrics or {})})
    rows.append(row)
    write_csv(results_dir / 'log.csv', rows)
    print(json.dumps({key: value for key, value in row.items() if value != ''}))


def warn_on_usage_mismatch(checkpoint: dict, args: argparse.Namespace) -> None:
    """A checkpoint of ours records the set it was pre-trained on; say so when it is not --encoder_usage_info."""
    recorded = checkpoint.get('args')
    recorded = recorded.get('pretraining_dataset') if isinstance(recorded, dict) else None
    if recorded and recorded != args.encoder_usage_info:
        print(f'warning: {args.pretrained_encoder} was pre-trained on {recorded}, but --encoder_usage_info is '
              f'{args.encoder_usage_info}: its inputs will be normalised for the wrong set', file=sys.stderr)


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


def restore_run(path: Path, args: argparse.Namespace, model: SimCLR, optimizer: torch.optim.Optimizer,
                results_dir: Path) -> tuple[int, list[dict]]:
    """Continue from a checkpoint: weights, optimiser, RNG states and the log rows up to its epoch."""
    checkpoint = resume_state(path)
    check_resumable(checkpoint, args, path, RESUME_MUST_MATCH)
    load_state_into(model, checkpoint['state_dict'], path)
    epoch = restore_optimizer(optimizer, checkpoint, path)
    rows = [row for row in read_csv(results_dir / 'log.csv') if int(row['epoch']) <= epoch]
    print(f'resuming from {path} (epoch {epoch})')
    return epoch + 1, rows


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(fix_readme_typo(sys.argv[1:] if argv is None else argv, parser))
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = resolve_device(args.device, args.gpu)
    normalization = get_info(args.encoder_usage_info).normalization

    # Inputs: every file is checked before anything is written.
    shadow_images = load_shadow_images(args)
    trigger, reference = load_attack_files(args, image_size=shadow_images.shape[1])
    model, clean_checkpoint = load_encoder(args.pretrained_encoder)
    warn_on_usage_mismatch(clean_checkpoint, args)
    monitor = load_monitor_data(args, trigger, reference.target_label)
    resume_from = prepare_results_dir(args, CHECKPOINT_PATTERN)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_json(results_dir / 'args.json', vars(args))
    model = to_channels_last(model.to(device), device)
    print(f'shadow set: {len(shadow_images)} images of {args.shadow_dataset}; {len(reference)} reference(s), '
          f'target label {reference.target_label}; {len(trigger)} trigger patch(es); device {device}')

    # The frozen clean encoder f0 only ever sees un-augmented inputs: its features of the whole shadow set
    # and of the references are computed once here and looked up by index during training.
    clean_features, clean_reference_features = clean_encoder_features(
        copy.deepcopy(model.f), shadow_images, reference.x, normalization, device, progress_disabled(args))
    references = normalize_batch(reference.x, normalization, device)  # (R, 3, H, W)
    device_references = torch.from_numpy(reference.x).to(device)  # (R, H, W, 3) uint8, for the fast path
    shadow = torch.from_numpy(shadow_images).to(device)  # (N, H, W, 3) uint8
    dataset = IndexedShadow(shadow_images, trigger, reference, test_transform(normalization),
                            finetune_transform(normalization))

    # Only f is trained (its BatchNorm affine parameters are frozen and get no gradient); g is kept as loaded.
    freeze_batchnorm(model.f)
    optimizer = torch.optim.SGD(model.f.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    encoder_forward = maybe_compile(model.f, args.compile)

    rows: list[dict] = []
    start_epoch = 1
    if resume_from is not None:
        start_epoch, rows = restore_run(resume_from, args, model, optimizer, results_dir)
        if start_epoch > args.epochs:
            print(f'nothing to do: {resume_from.name} already reached --epochs {args.epochs}')
            return
    elif monitor is not None:  # the state before training, as the original
        log_epoch(rows, results_dir, 0, None, evaluate_backdoor(model.f, monitor, normalization, args, device))

    for epoch in range(start_epoch, args.epochs + 1):
        loader = shadow_batches(dataset, args, normalization, epoch, device, device_references)
        losses = train_one_epoch(encoder_forward, loader, shadow, clean_features, references, clean_reference_features,
                                 trigger, dataset.trigger_index, optimizer, args, normalization, device, epoch)
        metrics = evaluate_backdoor(model.f, monitor, normalization, args, device) if monitor else None
        log_epoch(rows, results_dir, epoch, losses, metrics)
        if is_save_epoch(epoch, args.epochs, args.save_freq):
            save_run_checkpoint(results_dir / CHECKPOINT_PATTERN.format(epoch), model, optimizer, epoch, args,
                                target_label=reference.target_label)
    print(f'saved {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')


if __name__ == '__main__':
    run_main(main)
