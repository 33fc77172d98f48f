"""Stage 0: pre-train a clean SimCLR encoder (docs/DESIGN.md §4).

Two augmented views of each image of the pre-training split, NT-Xent loss (τ = --knn-t), Adam
(lr 1e-3, weight decay 1e-6), batch 256, 1000 epochs; a weighted-kNN monitor of `f` on the test set
after every epoch. With the paper's recipe (CIFAR10, ResNet18) the kNN accuracy reaches about 88%.

Trained on a poisoned copy of the pre-training split (`python -m datasets.poison`, e.g. with CTRL's trigger)
it yields a backdoored encoder. CTRL's own SimCLR recipe (github.com/meet-cjli/CTRL, main_train.py and
methods/base.py) is SGD, lr 0.06, momentum 0.9, weight decay 5e-4, batch 512, a linear warm-up over 10 epochs
then a cosine decay, 800 epochs in its README (1000 by default), temperature 0.5; --optimizer, --momentum,
--weight_decay, --schedule and --warmup_epochs give it (see `learning_rate` for how the schedule differs
from the code's). The defaults are the paper's Adam recipe, unchanged.

    # the paper's run (data/cifar10/{train,test}.npz prepared first, see data/README.md)
    python train_clean_encoder.py --pretraining_dataset cifar10 --epochs 1000 \
        --results_dir output/cifar10/clean_encoder
    # a quick CPU run on the offline synthetic set (python -m datasets.prepare synthetic_shapes first)
    python train_clean_encoder.py --pretraining_dataset synthetic_shapes --width 8 --batch_size 64 \
        --epochs 2 --results_dir output/synthetic/clean_encoder --device cpu
    # CTRL's recipe on a poisoned copy (python -m datasets.poison ... --out data/cifar10_ctrl first)
    python train_clean_encoder.py --data_dir data/cifar10_ctrl --optimizer sgd --lr 0.06 --momentum 0.9 \
        --weight_decay 5e-4 --schedule cosine --warmup_epochs 10 --batch_size 512 --epochs 800 \
        --results_dir output/cifar10/ctrl_encoder
    # continue a stopped run from its latest model_<epoch>.pth
    python train_clean_encoder.py ... --results_dir output/cifar10/clean_encoder --resume
    # 4 GPUs of one node (--batch_size stays the global batch; see common/distributed.py)
    torchrun --standalone --nproc_per_node 4 train_clean_encoder.py ... --results_dir output/cifar10/clean_encoder

Writes to --results_dir: args.json, log.csv (epoch, train_loss, test_acc@1) and model_<epoch>.pth at
the end (and every --save_freq epochs).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import distributed
from common.cli import check_save_freq, data_dir_for, print_args, progress_disabled, require_positive, seed_everything
from common.engine import Training
from common.pretraining import get_args_parser, train_one_epoch
from common.runs import prepare_results_dir, write_args
from core import processes
from core.cli import resume_flags, run_main
from core.errors import UsageError
from datasets import ImagePairs, get_info, load_split, simclr_transform
from datasets.fastpath import device_copy, maybe_compile, pair_batches, to_channels_last
from datasets.tensor_augment import CROP_SCALE
from evaluation.features import knn_monitor
from models import RAW_INPUTS, SimCLR, load_encoder

CHECKPOINT_PATTERN = 'model_{}.pth'


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, before anything is loaded or written (docs/DESIGN.md §11)."""
    for flag, value in (('--epochs', args.epochs), ('--batch_size', args.batch_size),
                        ('--knn-k', args.knn_k), ('--width', args.width)):
        require_positive(flag, value)
    if not args.lr > 0:
        raise UsageError(f'--lr must be positive, got {args.lr}')
    if not args.knn_t > 0:
        raise UsageError(f'--knn-t must be positive, got {args.knn_t}')
    check_save_freq(args.save_freq)
    if not 0 <= args.momentum < 1:
        raise UsageError(f'--momentum must lie in [0, 1), got {args.momentum}')
    if not args.weight_decay >= 0:
        raise UsageError(f'--weight_decay must be 0 or positive, got {args.weight_decay}')
    if not 0 < args.crop_min_scale <= 1:
        raise UsageError(f'--crop_min_scale must lie in (0, 1], got {args.crop_min_scale}')
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UsageError(f'--warmup_epochs must lie in 0..{args.epochs - 1} (fewer than --epochs), '
                         f'got {args.warmup_epochs}')


def learning_rate(epoch: int, base_lr: float, epochs: int, schedule: str = 'constant', warmup_epochs: int = 0,
                  ) -> float:
    """The learning rate of epoch `epoch` (1-based), E = epochs, W = warmup_epochs:

        epoch <= W (warm-up):    base_lr · epoch / W
        constant, epoch > W:     base_lr
        cosine, epoch > W:       base_lr · (1 + cos(π (epoch − W − 1) / (E − W))) / 2

    Set once at the start of each epoch (per epoch, as CTRL's code steps its scheduler), so it is a function of
    the epoch alone and a resumed run follows it exactly. CTRL's code (GradualWarmupScheduler(multiplier=1,
    total_epoch=10) then CosineAnnealingLR(T_max=epochs)) also warms up linearly and decays by a cosine, but
    its first epoch runs at lr 0 (its ramp is base_lr · (epoch − 1) / W), it holds base_lr for two epochs, and
    its cosine spans `epochs` epochs after the warm-up rather than the E − W that remain.
    """
    if epoch <= warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if schedule == 'constant':
        return base_lr
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs - 1) / (epochs - warmup_epochs))) / 2


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam (the paper's) or SGD with momentum (CTRL's), at --lr with --weight_decay."""
    if args.optimizer == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


@dataclass
class PretrainingData:
    """The pre-training images and the labelled splits of the kNN monitor."""
    images: np.ndarray  # uint8 (N, H, W, 3), the split SimCLR trains on
    memory: tuple[np.ndarray, np.ndarray]  # labelled training split: the kNN memory bank
    test: tuple[np.ndarray, np.ndarray]
    normalization: tuple
    image_size: int
    num_classes: int


def load_pretraining_data(args: argparse.Namespace) -> PretrainingData:
    info = get_info(args.pretraining_dataset)
    data_dir = data_dir_for(args, info.name)
    images, _ = load_split(info.name, info.pretraining_split, data_dir)
    memory = load_split(info.name, 'train', data_dir)
    test = load_split(info.name, 'test', data_dir)
    if len(images) < args.batch_size:
        raise UsageError(f'--batch_size {args.batch_size}: the {info.pretraining_split} split in {data_dir} '
                         f'has only {len(images)} images, fewer than one batch')
    normalization = RAW_INPUTS if args.no_normalize else info.normalization
    return PretrainingData(images, memory, test, normalization, info.image_size, info.num_classes)


def initial_model(args: argparse.Namespace) -> SimCLR:
    """A fresh SimCLR, or the encoder of --suffix_encoder (whose architecture and width win); --no_normalize
    (`raw_inputs`, recorded in its checkpoints) as given."""
    if not args.suffix_encoder:
        return SimCLR(arch=args.arch, width=args.width, raw_inputs=args.no_normalize)
    model, _ = load_encoder(args.suffix_encoder)
    if (model.arch, model.width) != (args.arch, args.width):
        print(f'note: {args.suffix_encoder} holds a {model.arch} of width {model.width}; '
              f'using it instead of --arch {args.arch} --width {args.width}')
    model.raw_inputs = args.no_normalize
    return model


def setup_training(args: argparse.Namespace, device: torch.device, must_match: dict) -> Training:
    """Model and optimiser: fresh, from --suffix_encoder, or (--resume) from the latest checkpoint.

    Creates the results folder, after --suffix_encoder has been checked, so a bad file writes nothing.
    """
    # a resumed run takes everything from the checkpoint that prepare_results_dir finds
    model = None if args.resume else initial_model(args)
    resume_from = prepare_results_dir(args, CHECKPOINT_PATTERN)
    if resume_from is not None:
        model, _ = load_encoder(resume_from)  # its architecture and width
    model = to_channels_last(model.to(device), device)
    training = Training(model, build_optimizer(model, args), args, args.epochs, Path(args.results_dir))
    if resume_from is not None:
        # a cosine schedule depends on the total number of epochs: extending such a run changes its past
        cosine = {'epochs': args.epochs} if args.schedule == 'cosine' else {}
        training.resume(resume_from, {**must_match, **cosine})  # the RNG states last: the model drew its init
    return training


def train(args: argparse.Namespace, training: Training, data: PretrainingData, device: torch.device) -> None:
    """Epochs training.start_epoch..args.epochs: learning rate, train, kNN monitor, log, checkpoint.

    Under torchrun every process trains (DDP; SyncBatchNorm on CUDA) and rank 0 alone runs the kNN monitor and
    writes the log and the checkpoints (of `model` itself: plain SimCLR keys).
    """
    model, optimizer, disable = training.model, training.optimizer, progress_disabled(args)
    crop_scale = (args.crop_min_scale, CROP_SCALE[1])
    pairs = ImagePairs(data.images, simclr_transform(data.normalization, data.image_size, crop_scale))
    device_images = device_copy(pairs, args, device)  # the fast path keeps the uint8 set on the device
    forward_model = maybe_compile(training.parallel(model, device), args.compile)

    for epoch in training.loop():
        set_learning_rate(optimizer, learning_rate(epoch, args.lr, args.epochs, args.schedule, args.warmup_epochs))
        # the batch order and the workers' augmentation seeds depend only on (seed, epoch)
        loader = pair_batches(pairs, args, data.normalization, epoch, device, device_images, crop_scale)
        row = {'epoch': epoch, 'train_loss': train_one_epoch(forward_model, loader, optimizer, args.knn_t, epoch,
                                                             device, args.amp, disable)}
        row['test_acc@1'] = knn_monitor(model.f, data.memory, *data.test, data.normalization, data.num_classes,
                                        args.knn_k, args.knn_t, device, disable_progress=disable) \
            if processes.is_main() else float('nan')  # once, not in every process (nothing else reads it)
        training.end_epoch(row)


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    print_args(args)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group

    data = load_pretraining_data(args)
    training = setup_training(args, device, resume_flags(parser))
    if training.finished:
        print(f'already trained for {training.start_epoch - 1} epochs (--epochs {args.epochs}); nothing to do')
        return
    results_dir = Path(args.results_dir)
    write_args(results_dir, args)

    train(args, training, data, device)
    print(f'saved {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')


if __name__ == '__main__':
    run_main(main)
