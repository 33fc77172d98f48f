"""Stage 1 — BadEncoder (Jia et al., S&P 2022): plant a backdoor in a clean SimCLR encoder (docs/DESIGN.md §5).

The encoder f (initialised from the clean encoder f0) is fine-tuned on the shadow set so that triggered images map
to the references while clean images and the references keep their clean features: L = L0 + λ1·L1 + λ2·L2, the
terms and the step in attacks/badencoder.py. Only f is trained; every BatchNorm of f stays in eval mode. The
driver calls the attack through the interface of attacks/badencoder.py, so that DRUPE runs through it too.

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
import sys
from pathlib import Path

import torch

from attacks import drupe
from attacks.badencoder import (IndexedShadow, clean_encoder_features, evaluate_backdoor, fix_readme_typo,
                                freeze_batchnorm, load_attack_files, load_monitor_data, load_shadow_images,
                                train_one_epoch)
from attacks.flags import ATTACKS, get_args_parser
from common import distributed
from common.cli import check_save_freq, print_args, progress_disabled, require_positive, seed_everything
from common.encoders import load_encoder
from common.engine import Training
from common.runs import check_layout_resumable, prepare_results_dir, save_layout_checkpoint, write_args
from core import processes
from core.cli import resume_flags, run_main
from core.errors import UsageError
from datasets import finetune_transform, get_info, normalize_batch, test_transform
from datasets.fastpath import maybe_compile, shadow_batches, to_channels_last
from models import VisualEncoder, encoder_input_size, encoder_normalization
from models.visual_checkpoint import RESUME_WEIGHTS

CHECKPOINT_PATTERN = 'model_{}.pth'


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The resolved arguments: the attack's own values (DRUPE's recipe under --attack drupe) replace the defaults
    of every flag not given."""
    parser = get_args_parser()
    argv = fix_readme_typo(argv, parser)
    args = parser.parse_args(argv)
    parser.set_defaults(**ATTACKS[args.attack].flag_defaults())
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, before anything is loaded."""
    for flag in ('pretrained_encoder', 'trigger_file', 'reference_file'):
        if not getattr(args, flag):
            raise UsageError(f'--{flag} is required')
    require_positive('--epochs', args.epochs)
    require_positive('--batch_size', args.batch_size)
    require_positive('--knn-k', args.knn_k)
    check_save_freq(args.save_freq)
    if not 0 < args.shadow_fraction <= 1:
        raise UsageError(f'--shadow_fraction must be in (0, 1], got {args.shadow_fraction}')
    if args.num_references is not None:
        require_positive('--num_references', args.num_references)
    drupe.check(args)


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group

    # Inputs: every file is checked before anything is written. A real-world encoder (CLIP, ImageNet) takes its own
    # normalisation and its 224-px input, has no kNN monitor (as the released code) and is saved in its file's layout.
    model, clean_checkpoint = load_encoder(args.pretrained_encoder, args, '--encoder_usage_info',
                                           args.encoder_usage_info)
    if isinstance(model, VisualEncoder) and args.attack != 'badencoder':
        raise UsageError(f'--attack {args.attack} supports only the CIFAR-style SimCLR; {args.pretrained_encoder} is '
                         f'a {model.family} encoder (BadEncoder, the default, handles it)')
    layout = clean_checkpoint.get('layout') if isinstance(model, VisualEncoder) else None
    image_size = encoder_input_size(model)
    shadow_images = load_shadow_images(args, image_size)
    trigger, reference = load_attack_files(args, image_size=shadow_images.shape[1],
                                           resize_references=image_size is not None)
    if layout is None:
        normalization = encoder_normalization(model, get_info(args.encoder_usage_info).normalization)
        monitor = load_monitor_data(args, trigger, reference.target_label)
    else:
        normalization, monitor = model.normalization, None
        check_layout_resumable(layout, args.pretrained_encoder, args.resume, 'backdoored')
    resume_from = prepare_results_dir(args, CHECKPOINT_PATTERN)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_args(results_dir, args)
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
    attack = ATTACKS[args.attack](args, device)
    num_copies = attack.copies(len(reference), len(trigger))

    # Only f is trained (its BatchNorm affine parameters are frozen and get no gradient); g is kept as loaded.
    freeze_batchnorm(model.f)
    optimizer = torch.optim.SGD(model.f.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    def checkpoint_keys(epoch: int) -> dict:
        return {'target_label': reference.target_label, **attack.checkpoint_keys(epoch, model)}

    def write_in_layout(epoch: int) -> None:  # a real-world encoder: its file's layout, the released code's reader
        save_layout_checkpoint(results_dir / CHECKPOINT_PATTERN.format(epoch), model, layout, optimizer, epoch, args,
                               log=training.rows, **checkpoint_keys(epoch))

    training = Training(model, optimizer, args, args.epochs, results_dir, columns=attack.columns,
                        writer=None if layout is None else write_in_layout)
    if resume_from is not None:
        # the last epoch's weights: DRUPE's final checkpoint holds its selected encoder as state_dict
        # the flags' defaults from a fresh parser: parse_args set DRUPE's values as defaults under --attack drupe,
        # and a checkpoint that records no attack flags ran BadEncoder with the parser's own defaults
        attack.restore(training.resume(resume_from, resume_flags(get_args_parser()),
                                       weights='last_state_dict' if layout is None else RESUME_WEIGHTS))
        if training.finished:
            print(f'nothing to do: {resume_from.name} already reached --epochs {args.epochs}')
            return
    else:
        attack.start(results_dir)
        if monitor is not None and processes.is_main():  # the state before training, as the original
            training.log({'epoch': 0, **evaluate_backdoor(model.f, monitor, normalization, args, device)})
    # Under torchrun the encoder is trained through DDP; its BatchNorm stays frozen (no SyncBatchNorm needed) and
    # its buffers never change (nothing to broadcast).
    encoder_forward = maybe_compile(training.parallel(model.f, device, sync_batchnorm=False, broadcast_buffers=False),
                                    args.compile)

    for epoch in training.loop():
        loader = shadow_batches(dataset, args, normalization, epoch, device, device_references)
        row = {'epoch': epoch, **train_one_epoch(
            encoder_forward, loader, shadow, clean_features, references, clean_reference_features, trigger,
            dataset.trigger_index, optimizer, args, normalization, device, epoch, objective=attack.objective(epoch),
            num_copies=num_copies)}
        row.update(attack.after_epoch(epoch, row, model, optimizer, results_dir, reference.target_label))
        if monitor and processes.is_main():  # the monitor runs once, in rank 0 (which alone logs)
            row.update(evaluate_backdoor(model.f, monitor, normalization, args, device))
        training.end_epoch(row, **checkpoint_keys(epoch))
    print(f'saved {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')
    output = attack.describe_output()
    if output:
        print(output)


if __name__ == '__main__':
    run_main(main)
