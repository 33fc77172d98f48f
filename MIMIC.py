"""Stage 2 — MIMIC: distil a clean student from a suspect (backdoored) encoder (SPEC §6).

The teacher is the suspect encoder, frozen. The student is a freshly initialised SimCLR of the same
architecture. Before distillation, the mutual information between each tapped layer and the
representation is estimated (MINE / Donsker–Varadhan, §6.1) and turned into attention-loss weights
(§6.2). The student then learns from a small clean subset D of the pre-training set with
    L = L_con + Σ_l opt_l · AT(S_l(x1), T_l(x1)) + opt5 · L_clone      (§6.3)
and the purified student is saved as `model<epoch>.pth` (no underscore, as the original).

The original README command:

    python -u MIMIC.py --lr 1e-2 --batch_size 128 --epochs 1000 --pretraining_dataset cifar10 \
        --teacher output/cifar10/badencoder/model_200.pth --ratio 0.04 --results_dir output/cifar10/mimic/

A quick CPU run on the offline synthetic set (`python -m datasets.prepare synthetic_shapes`):

    python MIMIC.py --pretraining_dataset synthetic_shapes --teacher <encoder.pth> --ratio 0.05 \
        --batch_size 64 --epochs 2 --mi_epochs 5 --results_dir /tmp/mimic

Writes to --results_dir: args.json, mi.json (MI per layer, weights, opt values), log.csv (one row per
epoch) and the checkpoints. `--resume` continues the latest checkpoint; the MI step is not repeated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm import tqdm

from common.cli import (StageParser, UsageError, autocast, check_finite, data_dir_for, print_args, progress_disabled,
                        require_positive, resolve_device, run_main, seed_everything, shared_parser)
from common.fastpath import add_speed_arguments, device_copy, maybe_compile, pair_batches, to_channels_last
from common.runs import (check_resumable, is_save_epoch, prepare_results_dir, restore_optimizer,
                         resume_state, save_run_checkpoint, write_csv, write_json)
from datasets import ImagePairs, get_info, load_split, normalize_batch, pretraining_names, simclr_transform
from models import TAPPED_LAYERS, CheckpointError, SimCLR, load_encoder
from models.checkpoint import load_state_into
from models.losses import attention_transfer, negative_cosine, nt_xent
from models.mutual_info import estimate_mi, layer_weights

CHECKPOINT_PATTERN = 'model{}.pth'
LAYER_NAMES = tuple(f'layer{index}' for index in TAPPED_LAYERS)  # keyed by the index in f.f (SPEC §3)
RESNET_STAGES = {f'layer{index}': f'f.f.{index} (ResNet layer{stage})'
                 for stage, index in enumerate(TAPPED_LAYERS, start=1)}
# Flags that shape the trajectory of a run: a resumed run must be given the same values.
RESUME_MUST_MATCH = ('pretraining_dataset', 'ratio', 'subset', 'seed', 'lr', 'batch_size', 'knn_t',
                     'opt5', 'mi_model', 'teacher', 'student', 'num_workers', 'augment')


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='MIMIC: distil a clean student from a suspect encoder '
                                                 '(stage 2 of the pipeline).', parents=[shared_parser()])
    parser.add_argument('--lr', default=0.001, type=float,
                        help='Adam learning rate of the student (default: 0.001; the README runs 1e-2)')
    parser.add_argument('--batch_size', default=128, type=int,
                        help='images per distillation step, also the MI estimator batch (default: 128)')
    parser.add_argument('--epochs', default=1000, type=int,
                        help='distillation epochs over the clean subset (default: 1000)')
    parser.add_argument('--pretraining_dataset', default='cifar10', type=str, choices=pretraining_names(),
                        help="the teacher's pre-training set: the clean subset comes from its pre-training "
                             'split, and it fixes the normalisation (default: cifar10)')
    for index, name in enumerate(LAYER_NAMES, start=1):
        parser.add_argument(f'--opt{index}', default=1000, type=float,
                            help=f'base attention-loss weight of {RESNET_STAGES[name]}; the MI adds up to '
                                 '10000 to it (default: 1000)')
    parser.add_argument('--opt5', default=1, type=float, help='weight of the clone (feature cosine) loss (default: 1)')
    parser.add_argument('--knn-t', default=0.5, type=float,
                        help='temperature of the NT-Xent loss, named as in the original (default: 0.5)')
    parser.add_argument('--knn-k', default=200, type=int,
                        help='kept from the original command line; MIMIC has no kNN monitor (default: 200)')
    parser.add_argument('--teacher', default='', type=str, metavar='PATH',
                        help='the suspect (backdoored) encoder checkpoint (required)')
    parser.add_argument('--student', default='', type=str, metavar='PATH',
                        help='start the student from this checkpoint (same architecture as the teacher) '
                             '(default: fresh random initialisation, as the paper)')
    parser.add_argument('--ratio', default=0.04, type=float,
                        help='fraction of the pre-training split used as the clean subset, in (0, 1] (default: 0.04)')
    parser.add_argument('--subset', default='first', choices=['first', 'random'],
                        help='first: the first ratio*N images, as the original; random: drawn with --seed '
                             '(default: first)')
    parser.add_argument('--mi_model', default='teacher', choices=['teacher', 'student'],
                        help='network whose layers the MI is measured on: teacher (the paper) or the '
                             'initial student (the released code) (default: teacher)')
    parser.add_argument('--mi_epochs', default=200, type=int,
                        help='training epochs of each layer\'s MI estimator (default: 200)')
    parser.add_argument('--save_freq', default=1000, type=int,
                        help='save model<epoch>.pth every this many epochs (0: only at the end), and at the end '
                             '(default: 1000)')
    add_speed_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, refused before anything is loaded or written (SPEC §11)."""
    if not 0 < args.ratio <= 1:
        raise UsageError(f'--ratio must lie in (0, 1], got {args.ratio}')
    if not args.teacher:
        raise UsageError('--teacher is required: the suspect encoder checkpoint to purify')
    if not args.results_dir:
        raise UsageError('--results_dir is required: the folder where the student and logs are written')
    require_positive('--epochs', args.epochs)
    require_positive('--mi_epochs', args.mi_epochs)
    if args.save_freq < 0:
        raise UsageError(f'--save_freq must be 0 (only at the end) or positive, got {args.save_freq}')
    if args.batch_size < 2:
        raise UsageError(f'--batch_size must be at least 2 (contrastive loss, BatchNorm), got {args.batch_size}')


def clean_subset(images: np.ndarray, ratio: float, subset: str, seed: int, batch_size: int,
                 source: str) -> np.ndarray:
    """D: the first ⌊ratio·N⌋ images (the original), or as many drawn at random with `seed` (SPEC §6)."""
    count = int(ratio * len(images))
    if count < batch_size:
        raise UsageError(f'--ratio {ratio} gives {count} of the {len(images)} images of {source}, fewer '
                         f'than one batch of {batch_size}; raise --ratio or lower --batch_size')
    if subset == 'first':
        return images[:count]
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(images), generator=generator)[:count].sort().values.numpy()
    return images[indices]


def load_teacher(path: str, device: torch.device, pretraining_dataset: str | None = None) -> SimCLR:
    """The suspect encoder, loaded safely, in eval mode and frozen: it never receives a gradient."""
    teacher, checkpoint = load_encoder(path)
    recorded = (checkpoint.get('args') or {}).get('encoder_usage_info') or \
        (checkpoint.get('args') or {}).get('pretraining_dataset')
    if pretraining_dataset and recorded and recorded != pretraining_dataset:
        print(f'warning: {path} was trained on {recorded} images, but --pretraining_dataset is '
              f'{pretraining_dataset}: the clean subset is normalised as {pretraining_dataset}', file=sys.stderr)
    teacher.eval().requires_grad_(False)
    return to_channels_last(teacher.to(device), device)


def build_student(teacher: SimCLR, student_path: str, device: torch.device) -> SimCLR:
    """A freshly initialised SimCLR of the teacher's config, or --student's weights (same config)."""
    if not student_path:
        return to_channels_last(SimCLR(**teacher.config).to(device), device)
    student, _ = load_encoder(student_path)
    if student.config != teacher.config:
        raise CheckpointError(f'{student_path}: the student is {student.config} but the teacher is '
                              f'{teacher.config}; they must have the same architecture')
    return to_channels_last(student.to(device), device)


@torch.no_grad()
def tapped_representations(model: SimCLR, images: np.ndarray, normalization, batch_size: int,
                           device: torch.device, disable_progress: bool = False,
                           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One eval-mode pass over the un-augmented images (SPEC §6.1): flattened tapped-layer outputs
    [(N, C_l·H_l·W_l) for each l] and the normalised feature z (N, d), all left on `device`.

    The network is frozen and D is not augmented, so these pairs are fixed and computed once.
    """
    was_training = model.training
    model.eval()
    taps, features = [[] for _ in TAPPED_LAYERS], []
    for start in tqdm(range(0, len(images), batch_size), desc='Caching tapped layers', leave=False,
                      disable=disable_progress):
        x = normalize_batch(images[start:start + batch_size], normalization, device)  # (B, 3, H, W)
        feature, _, batch_taps = model(x, return_taps=True)  # (B, d), [(B, C_l, H_l, W_l)]
        features.append(feature)
        for cache, tap in zip(taps, batch_taps):
            cache.append(torch.flatten(tap, start_dim=1))  # (B, C_l·H_l·W_l)
    model.train(was_training)
    return [torch.cat(cache) for cache in taps], torch.cat(features)


def locate_benign_knowledge(model: SimCLR, images: np.ndarray, normalization, *, base: list[float],
                            mi_epochs: int, batch_size: int, seed: int, device: torch.device,
                            disable_progress: bool = False) -> dict:
    """MI between each tapped layer and the representation, and the attention weights (SPEC §6.1-6.2).

    Returns {'mi': {layer: MI}, 'weights': [w_l], 'opt': [opt_l], 'fell_back': bool, 'history': ...}.
    """
    taps, z = tapped_representations(model, images, normalization, batch_size, device, disable_progress)
    generator = torch.Generator().manual_seed(seed)  # the permutations of the DV marginal term
    mi, history = {}, {}
    for name, h in zip(LAYER_NAMES, taps):
        with tqdm(total=mi_epochs, desc=f'MI {name}', disable=disable_progress) as bar:
            def on_epoch(epoch: int, estimate: float, bar=bar) -> None:
                bar.set_postfix(mi=f'{estimate:.4f}')
                bar.update(1)
            mi[name], history[name] = estimate_mi(h, z, epochs=mi_epochs, batch_size=batch_size,
                                                  generator=generator, on_epoch=on_epoch)
    opt, weights, fell_back = layer_weights([mi[name] for name in LAYER_NAMES], base)
    return {'mi': mi, 'weights': weights, 'opt': opt, 'base': list(base), 'fell_back': fell_back,
            'layers': RESNET_STAGES, 'history': history}


def report_weights(report: dict, mi_model: str) -> None:
    print(f'MI of each tapped layer with the representation ({mi_model}): '
          + ', '.join(f'{name} {report["mi"][name]:.4f}' for name in LAYER_NAMES))
    print('attention weights w: ' + ', '.join(f'{w:.4f}' for w in report['weights'])
          + ' -> opt: ' + ', '.join(f'{o:.1f}' for o in report['opt']))
    if report['fell_back']:
        print('warning: every MI estimate is 0 (estimation too short, or data without structure); '
              'the layer weights fall back to uniform', file=sys.stderr)


def distillation_losses(student: SimCLR, teacher: SimCLR, x1: torch.Tensor, x2: torch.Tensor,
                        opt_weights: list[float], opt5: float, temperature: float,
                        precision: Callable[[], ContextManager] = contextlib.nullcontext,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_con + Σ_l opt_l·AT(S_l(x1), T_l(x1)) + opt5·L_clone on one batch of two views (SPEC §6.3).

    One forward of the student per view and one of the teacher (no_grad): the tapped maps come from
    those passes. (The original ran the student a second time on x1 to collect the maps: the same
    outputs and gradients, but its BatchNorm running statistics were updated twice per step; once here.)
    Returns the loss and its unweighted terms (loss_con, loss_at1..4, loss_clone).
    """
    with precision():
        with torch.no_grad():
            feature_t, _, taps_t = teacher(x1, return_taps=True)
        feature_s, out_s1, taps_s = student(x1, return_taps=True)
        _, out_s2 = student(x2)
    terms = {'loss_con': nt_xent(out_s1.float(), out_s2.float(), temperature)}
    for index, (tap_s, tap_t) in enumerate(zip(taps_s, taps_t), start=1):
        terms[f'loss_at{index}'] = attention_transfer(tap_s.float(), tap_t.float())
    terms['loss_clone'] = negative_cosine(feature_s.float(), feature_t.float())
    loss = (terms['loss_con']
            + sum(w * terms[f'loss_at{i}'] for i, w in enumerate(opt_weights, start=1))
            + opt5 * terms['loss_clone'])
    return loss, terms


def train_one_epoch(student: SimCLR, teacher: SimCLR, loader, optimizer: torch.optim.Optimizer,
                    opt_weights: list[float], opt5: float, temperature: float, *, epoch: int, epochs: int,
                    device: torch.device, amp: bool = False, disable_progress: bool = False) -> dict:
    """One pass of distillation over the clean subset; returns the mean loss and terms of the epoch."""
    student.train()
    teacher.eval()
    totals, steps = {}, 0
    bar = tqdm(loader, disable=disable_progress)
    for step, (x1, x2) in enumerate(bar):
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        loss, terms = distillation_losses(student, teacher, x1, x2, opt_weights, opt5, temperature,
                                          precision=lambda: autocast(device, amp))
        check_finite(loss, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        for key, value in {'loss': loss, **terms}.items():
            totals[key] = totals.get(key, 0.0) + value.item()
        bar.set_description(f'Distill Epoch: [{epoch}/{epochs}] Loss: {totals["loss"] / steps:.4f}')
    return {key: value / steps for key, value in totals.items()}


def restore_run(path: Path, args: argparse.Namespace, student: SimCLR, optimizer: torch.optim.Optimizer,
                ) -> tuple[list[float], dict, list[dict], int]:
    """Student, optimiser, RNG states, opt weights and log rows of an interrupted run."""
    checkpoint = resume_state(path)  # restores the RNG states it recorded
    check_resumable(checkpoint, args, path, RESUME_MUST_MATCH)
    if 'opt' not in checkpoint or 'log' not in checkpoint:
        raise CheckpointError(f'{path}: not a MIMIC checkpoint of this script (no layer weights); cannot resume')
    load_state_into(student, checkpoint['state_dict'], path)
    epoch = restore_optimizer(optimizer, checkpoint, path)
    print(f"resuming from {path} (epoch {epoch}); opt: {checkpoint['opt']}")
    return list(checkpoint['opt']), checkpoint.get('mi', {}), list(checkpoint['log']), epoch


def distill(args: argparse.Namespace, student: SimCLR, teacher: SimCLR, optimizer: torch.optim.Optimizer,
            dataset: ImagePairs, opt_weights: list[float], mi: dict, rows: list[dict], start_epoch: int,
            device: torch.device, results_dir: Path) -> None:
    """Epochs start_epoch+1 .. --epochs: train, log, and save model<epoch>.pth every --save_freq and at the end."""
    normalization = get_info(args.pretraining_dataset).normalization
    device_images = device_copy(dataset, args, device)  # the fast path keeps the clean subset on the device
    student_forward, teacher_forward = maybe_compile(student, args.compile), maybe_compile(teacher, args.compile)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        loader = pair_batches(dataset, args, normalization, epoch, device, device_images)
        metrics = train_one_epoch(student_forward, teacher_forward, loader, optimizer, opt_weights, args.opt5, args.knn_t,
                                  epoch=epoch, epochs=args.epochs, device=device, amp=args.amp,
                                  disable_progress=progress_disabled(args))
        rows.append({'epoch': epoch, **metrics})
        write_csv(results_dir / 'log.csv', rows)
        print(json.dumps(rows[-1]))
        if is_save_epoch(epoch, args.epochs, args.save_freq):
            save_run_checkpoint(results_dir / CHECKPOINT_PATTERN.format(epoch), student, optimizer, epoch, args,
                                opt=opt_weights, mi=mi, log=rows)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = resolve_device(args.device, args.gpu)

    # Data: the clean subset D of the pre-training split, normalised as the teacher expects.
    info = get_info(args.pretraining_dataset)
    images, _ = load_split(info.name, info.pretraining_split, data_dir_for(args, info.name))
    clean = clean_subset(images, args.ratio, args.subset, args.seed, args.batch_size,
                         f'{info.name}/{info.pretraining_split}')

    # Models: the frozen teacher and a student of the same architecture.
    teacher = load_teacher(args.teacher, device, args.pretraining_dataset)
    student = build_student(teacher, args.student, device)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-6)

    resume_from = prepare_results_dir(args, CHECKPOINT_PATTERN)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_json(results_dir / 'args.json', vars(args))
    print(f'clean subset: {len(clean)} images of {info.name}/{info.pretraining_split} ({args.subset}); '
          f'teacher {teacher.config} on {device}')

    # Layer weights from the MI of each tapped layer (§6.1-6.2): once, before distillation.
    if resume_from is not None:
        opt_weights, mi, rows, start_epoch = restore_run(resume_from, args, student, optimizer)
    else:
        measured = teacher if args.mi_model == 'teacher' else student
        report = locate_benign_knowledge(measured, clean, info.normalization,
                                         base=[args.opt1, args.opt2, args.opt3, args.opt4],
                                         mi_epochs=args.mi_epochs, batch_size=args.batch_size, seed=args.seed,
                                         device=device, disable_progress=progress_disabled(args))
        report_weights(report, args.mi_model)
        write_json(results_dir / 'mi.json', {'mi_model': args.mi_model, **report})
        opt_weights, mi, rows, start_epoch = report['opt'], report['mi'], [], 0

    dataset = ImagePairs(clean, simclr_transform(info.normalization, info.image_size))
    distill(args, student, teacher, optimizer, dataset, opt_weights, mi, rows, start_epoch, device, results_dir)
    if start_epoch >= args.epochs:
        print(f'nothing to do: {resume_from} is already at epoch {start_epoch} of --epochs {args.epochs}')
    else:
        print(f'purified student: {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')


if __name__ == '__main__':
    run_main(main)
