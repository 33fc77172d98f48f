"""Stage 1 — BadEncoder (Jia et al., S&P 2022): plant a backdoor in a clean SimCLR encoder (docs/DESIGN.md §5).

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

Under `torchrun --nproc_per_node N train_badencoder.py ...` each process encodes its share of the global batch
(--batch_size) and the step's features are gathered, with their gradients, so that the objective (BadEncoder's or
DRUPE's, whose terms are statistics of the whole batch) is that of the global batch (common/distributed.py).

`--attack drupe` runs DRUPE (Tao et al., S&P 2024; terms, schedule and sources in attacks/drupe.py) instead:
BadEncoder with several references, its effectiveness term taken to the nearest reference, and terms that keep
the triggered embeddings' distribution close to the clean one and spread out. Every flag the command line leaves
out takes DRUPE's value (lr 0.05, 120 epochs, batch 256, 3 references, a 20% shadow set, its coefficients;
args.json records them), e.g. with three GTSRB "priority road" images as the references:

    python reference/make_reference.py --dataset gtsrb --class_id 12 --first 3 --out reference/cifar10/priority_n3.npz
    python train_badencoder.py --attack drupe --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --reference_file reference/cifar10/priority_n3.npz --downstreamTask gtsrb \
        --pretrained_encoder runs/clean/model_1000.pth --results_dir runs/drupe

Its log adds spread_std, trigger_sim, reference_sim, swd, swd_rel, cost_spread and cost_dist. DRUPE keeps the
epoch it selects (the smallest SWD among the epochs > 24 that met its targets) as best.pth; the final
model_<epochs>.pth, the attack's output that the next stages read, holds that encoder as its `state_dict`
(`selected_epoch` says which; the last epoch's weights, which --resume continues from, are `last_state_dict`).
With --drupe_output last, or when no epoch qualified, the output is the last epoch's encoder.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from attacks import drupe
from common import distributed
from common.cli import (StageParser, UsageError, check_finite, data_dir_for, print_args, progress_disabled,
                        require_positive, run_main, seed_everything, shared_parser)
from common.device import autocast
from common.fastpath import add_speed_arguments, maybe_compile, shadow_batches, to_channels_last
from common.features import encode_images, knn_accuracies
from common.runs import (check_resumable, is_save_epoch, prepare_results_dir, read_csv,
                         restore_optimizer, resume_state, save_run_checkpoint, with_later_defaults, write_csv,
                         write_json)
from datasets import (DATASETS, DataError, Reference, ShadowImages, Trigger, apply_trigger, finetune_transform,
                      get_info, load_reference, load_split, load_trigger, normalize_batch, pretraining_names,
                      split_path, test_transform, triggered_copy)
from models import SimCLR, load_encoder
from models.checkpoint import load_state_into
from models.losses import negative_cosine

CHECKPOINT_PATTERN = 'model_{}.pth'
BEST_CHECKPOINT = 'best.pth'  # DRUPE's selected epoch, under the name its code gives it
ATTACKS = ('badencoder', 'drupe')
# Flags that shape the trajectory of a run: a resumed run must be given the same values (--drupe_output only
# chooses among the epochs at the end, and may change).
RESUME_MUST_MATCH = ('shadow_dataset', 'encoder_usage_info', 'pretrained_encoder', 'trigger_file', 'reference_file',
                     'seed', 'lr', 'batch_size', 'lambda1', 'lambda2', 'num_workers', 'augment', 'attack',
                     'shadow_fraction', 'num_references', *(flag for flag in drupe.FLAGS if flag != 'drupe_output'))
# Flags added with --attack: a checkpoint whose recorded arguments lack them ran BadEncoder with their defaults.
ATTACK_FLAGS = ('attack', 'shadow_fraction', 'num_references', *drupe.FLAGS)
# BadEncoder's shadow set: all of CIFAR10's train split; for STL10 the *first* 50000 of its 100000 unlabeled images
# (the released code's np.random.seed(100); np.random.choice(50000, 50000, replace=False) only permutes indices
# 0..49999, and the loader shuffles each epoch anyway, so the order does not matter).
SHADOW_SIZE = 50000
SHADOW_SUBSET_SEED = 100  # the fixed numpy seed of DRUPE's --shadow_fraction subset (independent of --seed)
LOG_COLUMNS = ('epoch', 'loss', 'loss0', 'loss1', 'loss2', 'knn_acc', 'knn_asr')
DRUPE_LOG_COLUMNS = LOG_COLUMNS[:5] + drupe.TERMS + ('cost_spread', 'cost_dist') + LOG_COLUMNS[5:]
SWD_STREAM = 0x5D  # tells the SWD directions' seed sequence apart from any other drawn from (seed, epoch)


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
    parser.add_argument('--attack', default='badencoder', choices=ATTACKS,
                        help='badencoder (Jia et al., S&P 2022), or drupe (Tao et al., S&P 2024: attacks/drupe.py), '
                             "whose values fill every flag not given (default: badencoder)")
    parser.add_argument('--shadow_fraction', default=1.0, type=float,
                        help='use this fraction of the shadow set, a fixed random subset '
                             f"(default: 1.0; DRUPE: {drupe.RECIPE['shadow_fraction']})")
    parser.add_argument('--num_references', default=None, type=int, metavar='N',
                        help='use the first N references of --reference_file '
                             f"(default: all of them; DRUPE: {drupe.RECIPE['num_references']})")
    drupe.add_arguments(parser.add_argument_group(drupe.TITLE))
    add_speed_arguments(parser)
    distributed.add_distributed_arguments(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The resolved arguments: under --attack drupe, DRUPE's values replace the defaults of every flag not given."""
    parser = get_args_parser()
    argv = fix_readme_typo(argv, parser)
    args = parser.parse_args(argv)
    if args.attack == 'drupe':
        parser.set_defaults(**drupe.defaults())
        args = parser.parse_args(argv)
    return args


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
    if not 0 < args.shadow_fraction <= 1:
        raise UsageError(f'--shadow_fraction must be in (0, 1], got {args.shadow_fraction}')
    if args.num_references is not None:
        require_positive('--num_references', args.num_references)
    drupe.check(args)


# ----------------------------------------------------------------------------------------------- data

def fixed_subset(images: np.ndarray, size: int) -> np.ndarray:
    """`size` of the images, drawn without replacement by a fixed generator (SHADOW_SUBSET_SEED, whatever --seed
    is), in their original order."""
    keep = np.random.default_rng(SHADOW_SUBSET_SEED).permutation(len(images))[:size]
    return images[np.sort(keep)]


def load_shadow_images(args: argparse.Namespace) -> np.ndarray:
    """The shadow set: the first SHADOW_SIZE images of --shadow_dataset's pre-training split (all of CIFAR10's,
    the first 50000 of STL10's unlabeled, as the released code), of which a fixed --shadow_fraction is kept
    (DRUPE: 20%; its code draws them with --seed, 100 by default). See docs/DESIGN.md §5.2."""
    info = get_info(args.shadow_dataset)
    images, _ = load_split(args.shadow_dataset, info.pretraining_split, data_dir_for(args, args.shadow_dataset))
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


def load_attack_files(args: argparse.Namespace, image_size: int) -> tuple[Trigger, Reference]:
    trigger = load_trigger(args.trigger_file, image_size)
    reference = first_references(load_reference(args.reference_file, get_info(args.downstreamTask).num_classes,
                                                image_size), args.num_references, args.reference_file)
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


def triggered_inputs(images: torch.Tensor, trigger: Trigger, num_copies: int,
                     trigger_index, normalization) -> torch.Tensor:
    """(C·B, 3, H, W): the batch (B, H, W, 3) uint8 with trigger `trigger_index(c)` applied to copy c, c-major."""
    copies = [apply_trigger(images, trigger, trigger_index(c)) for c in range(num_copies)]
    return normalize_batch(torch.cat(copies), normalization)


def trigger_copies(attack: str, num_references: int, num_patches: int) -> int:
    """Triggered copies per shadow image: one per reference, except that DRUPE makes a single one when every
    reference shares one patch (BadEncoder keeps its R identical copies, as it always did)."""
    return 1 if attack == 'drupe' and num_patches == 1 else num_references


@dataclass
class StepFeatures:
    """One step's features of f (raw, as the encoder returns them) and the frozen f0's targets (normalised)."""
    clean: torch.Tensor  # (B, d) f(x)
    triggered: torch.Tensor  # (C, B, d) f(x ⊕ t_c): C = R copies, or 1 (see trigger_copies)
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
    if distributed.world_size() == 1:
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


def drupe_objective(features: StepFeatures, lambda1: float, lambda2: float, phase: str, state: drupe.DrupeState,
                    schedule: drupe.Schedule, generator: torch.Generator, num_projections: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(DRUPE's loss in `phase` with the epoch's costs, the terms): attacks/drupe.py's table."""
    terms = {**drupe.drupe_terms(features.clean, features.triggered, features.reference, generator,
                                 num_projections), **utility_terms(features)}
    weights = drupe.term_weights(phase, state.cost_spread, state.cost_dist, terms['spread_std'].item(),
                                 terms['reference_sim'].item(), lambda1, lambda2, schedule)
    return drupe.weighted_loss(terms, weights), terms


def projection_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's SWD directions: a function of (seed, epoch) alone, so a resumed run draws the
    same directions, and a stream of its own, apart from the data order's (seed·100003 + epoch)."""
    state = np.random.SeedSequence((seed % 2 ** 32, epoch, SWD_STREAM)).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def epoch_objective(args: argparse.Namespace, epoch: int, run: DrupeRun | None, device: torch.device):
    """The step loss of the epoch, StepFeatures -> (loss, terms): BadEncoder's, or DRUPE's (run given)."""
    if run is None:
        return partial(badencoder_objective, lambda1=args.lambda1, lambda2=args.lambda2)
    return partial(drupe_objective, lambda1=args.lambda1, lambda2=args.lambda2,
                   phase=drupe.phase_of(epoch, run.schedule), state=run.state, schedule=run.schedule,
                   generator=projection_generator(args.seed, epoch, device), num_projections=args.drupe_projections)


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
    encoder.train()
    freeze_batchnorm(encoder)
    num_references = len(references)
    objective = objective or partial(badencoder_objective, lambda1=args.lambda1, lambda2=args.lambda2)
    num_copies = num_copies or num_references
    totals: dict[str, float] = {}
    bar = tqdm(loader, desc=f'Train {epoch}/{args.epochs}', disable=progress_disabled(args))
    for step, (indices, augmented) in enumerate(bar, start=1):
        indices = indices.to(device, non_blocking=True)
        batch = len(indices)
        images = shadow[indices]  # (B, H, W, 3) uint8
        clean = normalize_batch(images, normalization)  # (B, 3, H, W)
        triggered = triggered_inputs(images, trigger, num_copies, trigger_index, normalization)  # (C·B, 3, H, W)
        augmented = augmented.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (R·B, 3, H, W)
        # Triggered copies and augmented references are both i-major (reference i's B samples together).
        # One forward of f for everything it sees this step: every BatchNorm of f is in eval mode, so a
        # sample's feature does not depend on what else is in the batch, and batching changes nothing.
        with autocast(device, args.amp):
            features = encoder(torch.cat([clean, triggered, augmented, references])).float()
        f_clean, f_triggered, f_augmented, f_reference = features.split(
            [batch, num_copies * batch, num_references * batch, num_references])
        loss, terms = objective(global_batch(StepFeatures(
            f_clean, f_triggered.view(num_copies, batch, -1), f_augmented.view(num_references, batch, -1),
            f_reference, clean_features[indices], clean_reference_features)))
        check_finite(loss, epoch, step)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        for name, value in {'loss': loss, **terms}.items():
            totals[name] = totals.get(name, 0.0) + value.item()
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


def log_epoch(rows: list[dict], results_dir: Path, epoch: int, losses: dict | None, metrics: dict | None,
              columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    row = {column: '' for column in columns}
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
                results_dir: Path) -> tuple[int, list[dict], dict]:
    """Continue from a checkpoint: weights, optimiser, RNG states and the log rows up to its epoch.

    Returns (first epoch to run, log rows, the checkpoint). The weights are the last epoch's: a DRUPE run's final
    checkpoint holds its selected encoder as `state_dict` and the last weights as `last_state_dict`.
    """
    # a checkpoint written before --attack existed is a BadEncoder run with the attack flags' defaults
    checkpoint = with_later_defaults(resume_state(path), get_args_parser(), ATTACK_FLAGS)
    check_resumable(checkpoint, args, path, RESUME_MUST_MATCH)
    load_state_into(model, checkpoint.get('last_state_dict', checkpoint['state_dict']), path)
    epoch = restore_optimizer(optimizer, checkpoint, path)
    rows = [row for row in read_csv(results_dir / 'log.csv') if int(row['epoch']) <= epoch]
    print(f'resuming from {path} (epoch {epoch})')
    return epoch + 1, rows, checkpoint


# ---------------------------------------------------------------------------------------------- DRUPE

@dataclass
class DrupeRun:
    """What a DRUPE run carries from epoch to epoch besides the model and the optimiser: its schedule, its
    costs and best candidate (attacks.drupe.DrupeState), and that candidate's weights (on the CPU)."""
    schedule: drupe.Schedule
    state: drupe.DrupeState
    best_weights: dict | None = None


def restore_drupe(checkpoint: dict, schedule: drupe.Schedule) -> DrupeRun:
    return DrupeRun(schedule, drupe.DrupeState(**checkpoint['drupe_state']), checkpoint.get('drupe_best'))


def drupe_after_epoch(run: DrupeRun, epoch: int, losses: dict[str, float], model: SimCLR,
                      optimizer: torch.optim.Optimizer, args: argparse.Namespace, results_dir: Path,
                      target_label: int) -> dict[str, float]:
    """Advance the run past `epoch` (costs, best candidate; a new best is written to best.pth at once, as DRUPE
    does, and kept in memory); returns the costs the epoch trained with, for its log row."""
    costs = {'cost_spread': run.state.cost_spread, 'cost_dist': run.state.cost_dist}
    run.state = drupe.end_of_epoch(run.state, epoch, losses, run.schedule)
    if run.state.best_epoch == epoch:
        run.best_weights = {key: value.detach().to('cpu', copy=True) for key, value in model.state_dict().items()}
        save_run_checkpoint(results_dir / BEST_CHECKPOINT, model, optimizer, epoch, args, target_label=target_label,
                            drupe_state=asdict(run.state))
        print(f'DRUPE: epoch {epoch} is the best candidate so far (swd {losses["swd"]:.4f}), saved {BEST_CHECKPOINT}')
    return costs


def selected_epoch(run: DrupeRun, args: argparse.Namespace) -> int:
    """The epoch whose encoder is DRUPE's output: the best candidate, or the last epoch (--drupe_output last,
    or no candidate)."""
    return run.state.best_epoch if args.drupe_output == 'best' and run.state.best_epoch else args.epochs


def drupe_checkpoint_keys(run: DrupeRun, epoch: int, args: argparse.Namespace, model: SimCLR) -> dict:
    """DRUPE's part of a checkpoint: its state and best weights (to resume), and in the last epoch's the output."""
    keys = {'drupe_state': asdict(run.state)}
    if run.best_weights is not None:
        keys['drupe_best'] = run.best_weights
    if epoch == args.epochs:
        keys['selected_epoch'] = selected_epoch(run, args)
        if keys['selected_epoch'] != epoch:
            # These override encoder_checkpoint's keys: the file's encoder is the selected one, which the next
            # stages load, and --resume (a longer run) continues from the last weights.
            keys.update(state_dict=run.best_weights, last_state_dict=model.state_dict())
    return keys


def describe_output(run: DrupeRun, args: argparse.Namespace) -> str:
    if args.drupe_output == 'best' and run.state.best_epoch:
        return (f'DRUPE output: epoch {run.state.best_epoch}, the smallest swd ({run.state.best_swd:.4f}) among the '
                f'epochs > {run.schedule.select_after} that met its targets (also in {BEST_CHECKPOINT})')
    reason = ('--drupe_output last' if args.drupe_output == 'last'
              else f'no epoch > {run.schedule.select_after} met its targets')
    return f'DRUPE output: the last epoch, {args.epochs} ({reason})'


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group
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
    print(f'{args.attack}: shadow set: {len(shadow_images)} images of {args.shadow_dataset}; {len(reference)} '
          f'reference(s), target label {reference.target_label}; {len(trigger)} trigger patch(es); device {device}')

    # The frozen clean encoder f0 only ever sees un-augmented inputs: its features of the whole shadow set
    # and of the references are computed once here and looked up by index during training.
    clean_features, clean_reference_features = clean_encoder_features(
        copy.deepcopy(model.f), shadow_images, reference.x, normalization, device, progress_disabled(args))
    references = normalize_batch(reference.x, normalization, device)  # (R, 3, H, W)
    device_references = torch.from_numpy(reference.x).to(device)  # (R, H, W, 3) uint8, for the fast path
    shadow = torch.from_numpy(shadow_images).to(device)  # (N, H, W, 3) uint8
    dataset = IndexedShadow(shadow_images, trigger, reference, test_transform(normalization),
                            finetune_transform(normalization))
    num_copies = trigger_copies(args.attack, len(reference), len(trigger))

    # Only f is trained (its BatchNorm affine parameters are frozen and get no gradient); g is kept as loaded.
    freeze_batchnorm(model.f)
    optimizer = torch.optim.SGD(model.f.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # Under torchrun the encoder is trained through DDP; its BatchNorm stays frozen (no SyncBatchNorm needed) and
    # its buffers never change (nothing to broadcast).
    encoder_forward = maybe_compile(distributed.data_parallel(model.f, device, sync_batchnorm=False,
                                                              broadcast_buffers=False), args.compile)
    run = None
    if args.attack == 'drupe':
        schedule = drupe.schedule_from_args(args)
        run = DrupeRun(schedule, drupe.initial_state(schedule))
    columns = LOG_COLUMNS if run is None else DRUPE_LOG_COLUMNS

    rows: list[dict] = []
    start_epoch = 1
    if resume_from is not None:
        start_epoch, rows, checkpoint = restore_run(resume_from, args, model, optimizer, results_dir)
        if run is not None:
            run = restore_drupe(checkpoint, run.schedule)
        if start_epoch > args.epochs:
            print(f'nothing to do: {resume_from.name} already reached --epochs {args.epochs}')
            return
    else:
        if run is not None and distributed.is_main():  # an earlier run's, left by --overwrite
            (results_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
        if monitor is not None and distributed.is_main():  # the state before training, as the original
            log_epoch(rows, results_dir, 0, None, evaluate_backdoor(model.f, monitor, normalization, args, device),
                      columns)

    for epoch in range(start_epoch, args.epochs + 1):
        loader = shadow_batches(dataset, args, normalization, epoch, device, device_references)
        losses = train_one_epoch(encoder_forward, loader, shadow, clean_features, references, clean_reference_features,
                                 trigger, dataset.trigger_index, optimizer, args, normalization, device, epoch,
                                 objective=epoch_objective(args, epoch, run, device), num_copies=num_copies)
        if run is not None:
            losses.update(drupe_after_epoch(run, epoch, losses, model, optimizer, args, results_dir,
                                            reference.target_label))
        # the monitor runs once, in rank 0 (which alone logs)
        metrics = evaluate_backdoor(model.f, monitor, normalization, args, device) \
            if monitor and distributed.is_main() else None
        log_epoch(rows, results_dir, epoch, losses, metrics, columns)
        if is_save_epoch(epoch, args.epochs, args.save_freq):
            extra = {} if run is None else drupe_checkpoint_keys(run, epoch, args, model)
            save_run_checkpoint(results_dir / CHECKPOINT_PATTERN.format(epoch), model, optimizer, epoch, args,
                                target_label=reference.target_label, **extra)
        distributed.barrier()  # the epoch is on disk before any process starts the next one
    print(f'saved {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')
    if run is not None:
        print(describe_output(run, args))


if __name__ == '__main__':
    run_main(main)
