#!/usr/bin/env python
"""Throughput of every pipeline stage on this machine, at CIFAR scale, on synthetic data held in memory.

Each figure runs the stage's own training function on the stage's own data path (the scripts'
`train_one_epoch` fed by `datasets.fastpath` as the scripts feed it, the probe's `common.probes.train_one_epoch`
and evaluation, MIMIC's `tapped_representations` and `estimate_mi`), with the paper's architecture (ResNet18, width 64) and batch
sizes, on 32x32 RGB images from `datasets.synthetic`; --augment and --compile are passed on as given:

    simclr_img_per_s       stage 0: SimCLR training, images per second (one image = its two views), batch 256
    badencoder_img_per_s   stage 1: BadEncoder training, shadow images per second, batch 256, 1 reference
    mimic_img_per_s        stage 2: MIMIC distillation, images per second (two views each), batch 128
    mi_estimation_s        stage 2: seconds of the MI estimation (2000 images, 4 layers, 200 epochs)
    downstream_s           stage 3: seconds of the probe (39209 GTSRB-sized features, 43 classes, 1000 epochs)
    probe_group_speedup    stage 3 with N encoders (N = 3, 10): N probes trained one after the other / the same N
                           trained as one group, the same features and epochs (probe_group_epoch_s: the group's)
    defences               stage 2, the baselines: for each of ft, fp, nad, clp, anp, kd, invert, sslcleanse, the
                           seconds of its whole `purify` (pre-steps, training, pruning) on `defence_images` clean images,
                           1 epoch for those that train (batch --mimic_batch_size), --steps + --warmup ANP
                           iterations and inversion steps; img_per_s = clean images × epochs / seconds

Throughputs are timed over --steps steps after --warmup steps (data loading included, the loader's
start-up excluded). MI and probe times are measured in full, or, when fewer epochs are measured
(--mi_measure_epochs, --probe_measure_epochs, set small by --quick), extrapolated linearly to the full
count; the JSON line says which. Also reported: the forward passes per step (a distillation step runs
the student twice and the teacher once; the MI estimation runs the network once per image), a kNN
monitor estimate and the paper's full configuration extrapolated from the measured throughput.

    python scripts/benchmark.py --quick --device cpu     # under 2 minutes on 2 CPU cores
    python scripts/benchmark.py --device cuda            # the full measurement, for a GPU

With `--arch` naming a real-world encoder family (clip_rn50, imagenet_resnet50, torchvision_resnet18/34/50; random
weights, 224-pixel inputs), the line holds that family's two costs instead:

    visual_feature_img_per_s   stage 3: the tower's feature pass (eval mode, no gradient), images per second, batch
                               --visual_batch_size: what computing a downstream set's features costs
    visual_mimic_img_per_s     stage 2: one MIMIC distillation step (teacher once, student on both views, the
                               attention terms on the four stages, backward, Adam), images per second at
                               --mimic_batch_size; the views are given as tensors (augmentation not timed)

Progress goes to stderr; stdout is one JSON line. docs/BENCHMARKS.md holds the figures measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ''):  # run as `python scripts/benchmark.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from attacks import badencoder  # noqa: E402
from attacks import flags as attack_flags  # noqa: E402
from common import pretraining, probes  # noqa: E402
from common.cli import require_positive, seed_everything  # noqa: E402
from core.cli import StageParser, run_main  # noqa: E402
from core.device import autocast, resolve_device  # noqa: E402
from core.errors import UsageError  # noqa: E402
from datasets import (ImagePairs, Reference, Trigger, finetune_transform, get_info, normalize_batch,  # noqa: E402
                      simclr_transform, test_transform)
from datasets.fastpath import (add_speed_arguments, maybe_compile, pair_batches, shadow_batches,  # noqa: E402
                               to_channels_last, use_tensor_augment)
from datasets.synthetic import make_synthetic  # noqa: E402
from defences import BASELINES, TRAINING_BASELINES, baselines, get_defence  # noqa: E402
from defences import mimic as mimic_steps  # noqa: E402
from defences.training import DefenceRun  # noqa: E402
from evaluation.features import knn_classify  # noqa: E402
from evaluation.probe import evaluate  # noqa: E402
from models import ARCHITECTURES, PAPER_WIDTH, MLPProbe, ProbeGroup, SimCLR, feature_dim_of  # noqa: E402
from models.visual import FAMILIES, VisualEncoder  # noqa: E402
from models.mutual_info import estimate_mi, layer_weights  # noqa: E402
from models.probe_group import OneProbe  # noqa: E402
from trigger.make_trigger import make_trigger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tools import (TimedLoader, counting_forwards, extrapolated_figures, probe_figures,  # noqa: E402
                         synchronize)

REPO = Path(__file__).resolve().parents[1]
FIGURES = ('simclr_img_per_s', 'badencoder_img_per_s', 'mimic_img_per_s', 'mi_estimation_s', 'downstream_s')
NORMALIZATION = get_info('cifar10').normalization  # CIFAR scale: the paper's pre-training set
IMAGE_SIZE = 32
CIFAR10_TRAIN, CIFAR10_TEST = get_info('cifar10').splits['train'], get_info('cifar10').splits['test']
GTSRB = get_info('gtsrb')
GTSRB_PRIORITY = 12  # the paper's target label ("Priority road")
PAPER = {'batch_size': 256, 'badencoder_batch_size': 256, 'mimic_batch_size': 128, 'clean_images': 2000,
         'stage0_epochs': 1000, 'stage1_epochs': 200, 'stage2_epochs': 1000}  # docs/DESIGN.md §4-6; 2000 = ratio 0.04
# The counts a run measures unless given: the full run, and --quick, which fits in 2 minutes on 2 CPU cores
# (fewer steps at smaller batches, a few MI and probe epochs extrapolated, a tenth of the kNN queries).
FULL = {'threads': 0, 'steps': 10, 'knn_queries': CIFAR10_TEST,
        **{key: PAPER[key] for key in ('batch_size', 'badencoder_batch_size', 'mimic_batch_size')}}
QUICK = {'steps': 2, 'batch_size': 64, 'badencoder_batch_size': 64, 'mimic_batch_size': 32,
         'mi_measure_epochs': 1, 'probe_measure_epochs': 3, 'knn_queries': 1000, 'threads': 1}
# A real-world family (--arch clip_rn50, ...): 224-pixel images, so --quick steps at batch 2
VISUAL_FULL = {'visual_batch_size': 64}
VISUAL_QUICK = {'visual_batch_size': 2, 'mimic_batch_size': 2}


def get_args_parser(defences: str = ','.join(BASELINES),
                    defences_help: str = 'default: all eight') -> argparse.ArgumentParser:
    """The benchmark's flags; `defences` and `defences_help`: --defences's default and how its help names it."""
    parser = StageParser(description='Measure the throughput of every pipeline stage on this machine '
                                     '(synthetic CIFAR-scale data in memory); prints one JSON line.')
    parser.add_argument('--device', default='auto', type=str, metavar='auto|cpu|cuda|cuda:N',
                        help='where to run: auto picks CUDA when present (default: auto)')
    parser.add_argument('--gpu', default='0', type=str, help='which CUDA device --device auto|cuda uses')
    parser.add_argument('--num_workers', default=2, type=int,
                        help='DataLoader worker processes for the augmentations, as the stages (default: 2)')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA, as the stages\' --amp')
    parser.add_argument('--threads', default=None, type=int,
                        help='torch CPU threads, 0 = torch\'s choice (default: 0; --quick: 1, because on a CPU shared '
                             'with other processes threads that wait for a busy core slow small steps many times over)')
    parser.add_argument('--seed', default=100, type=int, help='random seed (default: 100)')
    parser.add_argument('--no_progress', action='store_true', help='hide the progress bars')
    parser.add_argument('--quick', action='store_true',
                        help=f'a short run (under 2 minutes on 2 CPU cores): {QUICK["steps"]} timed steps per stage at '
                             f'batches {QUICK["batch_size"]}/{QUICK["badencoder_batch_size"]}/'
                             f'{QUICK["mimic_batch_size"]} (stages 0/1/2), {QUICK["mi_measure_epochs"]} MI epoch and '
                             f'{QUICK["probe_measure_epochs"]} probe epochs timed and extrapolated, '
                             f'{QUICK["knn_queries"]} kNN queries, 1 CPU thread; flags given explicitly win')
    parser.add_argument('--arch', default='resnet18', choices=sorted(ARCHITECTURES) + sorted(FAMILIES),
                        help='encoder architecture (default: resnet18, the paper); a real-world family '
                             f'({", ".join(sorted(FAMILIES))}) times its feature pass and MIMIC step instead')
    parser.add_argument('--visual_batch_size', default=None, type=int,
                        help=f'batch of a real-world family\'s feature pass (default: {VISUAL_FULL["visual_batch_size"]}; '
                             f'--quick: {VISUAL_QUICK["visual_batch_size"]}, as its --mimic_batch_size)')
    parser.add_argument('--width', default=PAPER_WIDTH, type=int,
                        help=f'base channels of the ResNet (default: {PAPER_WIDTH}, the paper)')
    parser.add_argument('--warmup', default=1, type=int, help='untimed steps before each measurement (default: 1)')
    for name, stage in (('steps', 'timed training steps per stage'), ('batch_size', 'stage 0 (SimCLR) batch'),
                        ('badencoder_batch_size', 'stage 1 (BadEncoder) batch'),
                        ('mimic_batch_size', 'stage 2 (MIMIC distillation) batch')):
        parser.add_argument(f'--{name}', default=None, type=int,
                            help=f'{stage} (default: {FULL[name]}; --quick: {QUICK[name]})')
    parser.add_argument('--mi_batch_size', default=128, type=int,
                        help='batch of the MI estimator (default: 128, MIMIC\'s --batch_size)')
    parser.add_argument('--mi_images', default=2000, type=int,
                        help='clean images of the MI estimation (default: 2000, ratio 0.04 of CIFAR10)')
    parser.add_argument('--mi_epochs', default=200, type=int,
                        help='MI estimator epochs the figure is for (default: 200, the paper)')
    parser.add_argument('--mi_measure_epochs', default=None, type=int,
                        help='MI estimator epochs actually run per layer, extrapolated linearly to --mi_epochs '
                             f'(default: --mi_epochs; --quick: {QUICK["mi_measure_epochs"]})')
    parser.add_argument('--probe_features', default=GTSRB.splits['train'], type=int,
                        help=f'training features of the probe (default: {GTSRB.splits["train"]}, GTSRB train)')
    parser.add_argument('--probe_test_features', default=GTSRB.splits['test'], type=int,
                        help=f'test features, evaluated clean and triggered after every epoch '
                             f'(default: {GTSRB.splits["test"]}, GTSRB test)')
    parser.add_argument('--probe_classes', default=GTSRB.num_classes, type=int,
                        help=f'classes of the probe (default: {GTSRB.num_classes}, GTSRB)')
    parser.add_argument('--probe_batch_size', default=64, type=int, help='probe batch (default: 64)')
    parser.add_argument('--probe_epochs', default=1000, type=int,
                        help='probe epochs the figure is for (default: 1000, the README)')
    parser.add_argument('--probe_measure_epochs', default=None, type=int,
                        help='probe epochs actually run, extrapolated linearly to --probe_epochs '
                             f'(default: --probe_epochs; --quick: {QUICK["probe_measure_epochs"]})')
    parser.add_argument('--knn_bank', default=CIFAR10_TRAIN, type=int,
                        help=f'memory bank of the kNN monitor estimate (default: {CIFAR10_TRAIN}, CIFAR10 train)')
    parser.add_argument('--knn_queries', default=None, type=int,
                        help=f'kNN queries timed, extrapolated linearly to the {CIFAR10_TEST} CIFAR10 test images '
                             f'(default: {CIFAR10_TEST}; --quick: {QUICK["knn_queries"]})')
    parser.add_argument('--defences', default=defences, type=str,
                        help=f'baseline defences to time, comma-separated, or none ({defences_help})')
    add_speed_arguments(parser)  # --augment and --compile, passed on to the stages
    return parser


def resolve_counts(args: argparse.Namespace) -> None:
    """Fill the measured counts left unset: --quick's short values, else the full ones; check them all."""
    full = {**FULL, 'mi_measure_epochs': args.mi_epochs, 'probe_measure_epochs': args.probe_epochs}
    counts = QUICK if args.quick else full
    if args.arch in FAMILIES:
        counts = {**counts, **(VISUAL_QUICK if args.quick else VISUAL_FULL)}
    for name, value in counts.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.mi_measure_epochs = min(args.mi_measure_epochs, args.mi_epochs)
    args.probe_measure_epochs = min(args.probe_measure_epochs, args.probe_epochs)
    for name in ('width', 'steps', 'batch_size', 'badencoder_batch_size', 'mi_batch_size', 'mi_images', 'mi_epochs',
                 'mi_measure_epochs', 'probe_features', 'probe_test_features', 'probe_classes', 'probe_batch_size',
                 'probe_epochs', 'probe_measure_epochs', 'knn_bank', 'knn_queries', 'visual_batch_size'):
        if getattr(args, name) is not None:  # --visual_batch_size is set only for a real-world family
            require_positive(f'--{name}', getattr(args, name))
    if args.warmup < 0 or args.num_workers < 0 or args.threads < 0:
        raise UsageError('--warmup, --num_workers and --threads must be 0 or positive')
    if args.mimic_batch_size < 2:
        raise UsageError(f'--mimic_batch_size must be at least 2 (contrastive loss), got {args.mimic_batch_size}')
    if args.mi_images < max(args.mimic_batch_size, args.mi_batch_size):
        raise UsageError(f'--mi_images {args.mi_images} is smaller than one batch of --mimic_batch_size or '
                         '--mi_batch_size')


# ------------------------------------------------------------------------------------- measurement tools

def stage_args(stage, args: argparse.Namespace, batch_size: int, device: torch.device) -> argparse.Namespace:
    """The stage's own flag defaults (`stage.get_args_parser()`, the parser its script uses), with the benchmark's
    batch, device, seed, workers and speed flags."""
    return stage.get_args_parser().parse_args(
        ['--batch_size', str(batch_size), '--epochs', '1', '--device', str(device), '--seed', str(args.seed),
         '--num_workers', str(args.num_workers), '--augment', args.augment]
        + ['--amp'] * args.amp + ['--compile'] * args.compile + ['--no_progress'] * args.no_progress)


def images_needed(batch_size: int, args: argparse.Namespace) -> int:
    """Images for the warm-up and timed steps: one epoch of exactly that many batches."""
    return batch_size * (args.warmup + args.steps)


def pair_loader(images: np.ndarray, run_args: argparse.Namespace, warmup: int, device: torch.device) -> TimedLoader:
    """The view pairs of stages 0 and 2 through the stages' data path, timed: datasets.fastpath.pair_batches,
    PIL transforms in DataLoader workers or batched tensor augmentation on the device (--augment)."""
    pairs = ImagePairs(images, simclr_transform(NORMALIZATION, IMAGE_SIZE))
    return TimedLoader(pair_batches(pairs, run_args, NORMALIZATION, 1, device), warmup, device)


# ------------------------------------------------------------------------------------------------ stages

def bench_simclr(images: np.ndarray, args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 0: common.pretraining.train_one_epoch (Adam, NT-Xent) on the stage's view pairs."""
    run_args = stage_args(pretraining, args, args.batch_size, device)
    model = to_channels_last(SimCLR(arch=args.arch, width=args.width).to(device), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=run_args.lr,
                                 weight_decay=pretraining.ADAM_WEIGHT_DECAY)
    forward_model = maybe_compile(model, run_args.compile)
    loader = pair_loader(images[:images_needed(args.batch_size, args)], run_args, args.warmup, device)
    with counting_forwards(forward_model) as forwards:
        pretraining.train_one_epoch(forward_model, loader, optimizer, run_args.knn_t, 1, device, args.amp, disable)
    return {'simclr_img_per_s': args.batch_size * loader.timed_steps / loader.seconds,
            'simclr_forwards_per_step': forwards['calls'] / len(loader)}


def paper_trigger() -> Trigger:
    """The paper's trigger, made in memory: a white 10x10 square at rows and columns 21..30."""
    patch, mask = make_trigger(IMAGE_SIZE, 21, 21, 10, (255, 255, 255))
    return Trigger(patch, mask, ('white_21_10', 'replace'))


def bench_badencoder(images: np.ndarray, args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 1: attacks.badencoder.train_one_epoch with one reference, set up as its main() does; also times
    the one-off pass of the frozen clean encoder f0 over the shadow set (encode_img_per_s), after an untimed
    pass when --warmup > 0: a real run spreads cuDNN's algorithm search over its whole set, not these few batches."""
    batch = args.badencoder_batch_size
    run_args = stage_args(attack_flags, args, batch, device)
    shadow_images = images[:images_needed(batch, args)]
    reference = Reference(images[-1:], np.array([GTSRB_PRIORITY]))
    trigger = paper_trigger()
    model = to_channels_last(SimCLR(arch=args.arch, width=args.width).to(device), device)

    clean_encoder = copy.deepcopy(model.f)
    if args.warmup:  # untimed: the first pass of each batch shape pays cuDNN's algorithm search (cudnn.benchmark)
        badencoder.clean_encoder_features(clean_encoder, shadow_images, reference.x, NORMALIZATION, device,
                                          disable)
    synchronize(device)
    start = time.perf_counter()
    clean_features, clean_reference_features = badencoder.clean_encoder_features(
        clean_encoder, shadow_images, reference.x, NORMALIZATION, device, disable)
    synchronize(device)
    encode_img_per_s = (len(shadow_images) + len(reference)) / (time.perf_counter() - start)

    references = normalize_batch(reference.x, NORMALIZATION, device)  # (R, 3, H, W)
    device_references = torch.from_numpy(reference.x).to(device)  # (R, H, W, 3) uint8, for the tensor path
    shadow = torch.from_numpy(shadow_images).to(device)  # (N, H, W, 3) uint8
    dataset = badencoder.IndexedShadow(shadow_images, trigger, reference, test_transform(NORMALIZATION),
                                       finetune_transform(NORMALIZATION))
    badencoder.freeze_batchnorm(model.f)
    optimizer = torch.optim.SGD(model.f.parameters(), lr=run_args.lr, momentum=0.9, weight_decay=5e-4)
    encoder_forward = maybe_compile(model.f, run_args.compile)
    loader = TimedLoader(shadow_batches(dataset, run_args, NORMALIZATION, 1, device, device_references),
                         args.warmup, device)
    with counting_forwards(encoder_forward) as forwards:
        badencoder.train_one_epoch(encoder_forward, loader, shadow, clean_features, references,
                                   clean_reference_features, trigger, dataset.trigger_index, optimizer,
                                   run_args, NORMALIZATION, device, 1)
    return {'badencoder_img_per_s': batch * loader.timed_steps / loader.seconds,
            'badencoder_encoder_forwards_per_step': forwards['calls'] / len(loader),
            'encode_img_per_s': encode_img_per_s}


def mimic_models(args: argparse.Namespace, device: torch.device) -> tuple[SimCLR, SimCLR]:
    """A frozen teacher (eval mode, no gradients, as defences.stage.load_suspect) and a fresh student."""
    teacher = SimCLR(arch=args.arch, width=args.width).eval().requires_grad_(False)
    teacher = to_channels_last(teacher.to(device), device)
    return teacher, mimic_steps.build_student(teacher, '', device)


def bench_mimic(images: np.ndarray, args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 2 distillation: defences.mimic.train_one_epoch (distillation_losses, Adam) on the stage's view pairs."""
    run_args = stage_args(mimic_steps, args, args.mimic_batch_size, device)
    teacher, student = mimic_models(args, device)
    optimizer = torch.optim.Adam(student.parameters(), lr=run_args.lr, weight_decay=1e-6)
    base = [run_args.opt1, run_args.opt2, run_args.opt3, run_args.opt4]
    opt_weights, _, _ = layer_weights([1.0] * len(base), base)  # equal MI: the cost does not depend on the weights
    student_forward = maybe_compile(student, run_args.compile)
    teacher_forward = maybe_compile(teacher, run_args.compile)
    loader = pair_loader(images[:images_needed(args.mimic_batch_size, args)], run_args, args.warmup, device)
    with counting_forwards(student_forward) as student_forwards, counting_forwards(teacher_forward) as teacher_forwards:
        mimic_steps.train_one_epoch(student_forward, teacher_forward, loader, optimizer, opt_weights, run_args.opt5,
                              run_args.knn_t, epoch=1, epochs=1, device=device, amp=args.amp,
                              disable_progress=disable)
    return {'mimic_img_per_s': args.mimic_batch_size * loader.timed_steps / loader.seconds,
            'mimic_student_forwards_per_step': student_forwards['calls'] / len(loader),
            'mimic_teacher_forwards_per_step': teacher_forwards['calls'] / len(loader)}


def bench_mi(images: np.ndarray, args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 2 MI estimation, as defences.mimic.locate_benign_knowledge runs it: one cached pass of the network over
    the clean images (tapped_representations), then estimate_mi per tapped layer on the cached tensors.

    The cached pass is timed once; the estimator's epochs are timed per layer and scaled linearly from
    --mi_measure_epochs to --mi_epochs.
    """
    teacher, _ = mimic_models(args, device)
    clean = images[:args.mi_images]
    with counting_forwards(teacher) as passes:
        synchronize(device)
        start = time.perf_counter()
        taps, z = mimic_steps.tapped_representations(teacher, clean, NORMALIZATION, args.mi_batch_size, device, disable)
        synchronize(device)
        cache_seconds = time.perf_counter() - start
        generator = torch.Generator().manual_seed(args.seed)
        layer_seconds = {}
        for name, h in zip(mimic_steps.LAYER_NAMES, taps):
            with tqdm(total=args.mi_measure_epochs, desc=f'MI {name} ({h.shape[1]}-d)', disable=disable) as bar:
                start = time.perf_counter()
                estimate_mi(h, z, epochs=args.mi_measure_epochs, batch_size=args.mi_batch_size,
                            generator=generator, on_epoch=lambda epoch, estimate, bar=bar: bar.update(1))
                synchronize(device)
                layer_seconds[name] = time.perf_counter() - start
    scale = args.mi_epochs / args.mi_measure_epochs
    return {'mi_estimation_s': cache_seconds + scale * sum(layer_seconds.values()),
            'mi_cache_s': cache_seconds,
            'mi_epoch_s': {name: seconds / args.mi_measure_epochs for name, seconds in layer_seconds.items()},
            'mi_network_passes_per_image': passes['images'] / len(clean)}


def defence_names(args: argparse.Namespace) -> list[str]:
    """The baselines --defences names (none: []), each checked."""
    names = [] if args.defences == 'none' else args.defences.split(',')
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise UsageError(f"--defences: unknown {sorted(unknown)}, expected some of {', '.join(BASELINES)} or none")
    return names


def bench_defences(images: np.ndarray, args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Each baseline's `purify`, as baseline_defence.py calls it, timed whole on images_needed(mimic batch) images."""
    names = defence_names(args)
    clean = images[:images_needed(args.mimic_batch_size, args)]
    iterations = str(args.warmup + args.steps)
    seconds, rates = {}, {}
    for name in names:
        run_args = baselines.get_args_parser().parse_args(
            ['--defence', name, '--teacher', 'benchmark', '--results_dir', 'benchmark', '--epochs', '1',
             '--batch_size', str(args.mimic_batch_size), '--seed', str(args.seed), '--num_workers', str(args.num_workers),
             '--augment', args.augment, '--anp_iterations', iterations, '--invert_steps', iterations]
            + ['--amp'] * args.amp + ['--compile'] * args.compile + ['--no_progress'] * disable)
        run_args.lr = baselines.DEFAULT_LR.get(name, 1e-3)
        suspect, _ = mimic_models(args, device)  # a frozen teacher of the paper's architecture
        with tempfile.TemporaryDirectory() as folder:
            run = DefenceRun(run_args, NORMALIZATION, device, Path(folder))
            synchronize(device)
            start = time.perf_counter()
            get_defence(name).purify(suspect, clean, run)
            synchronize(device)
            seconds[name] = time.perf_counter() - start
        if name in TRAINING_BASELINES:
            rates[name] = len(clean) / seconds[name]
    return {'defence_s': seconds, 'defence_img_per_s': rates, 'defence_images': len(clean)}


def random_features(count: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=generator), dim=1).to(device)  # (count, dim)


def bench_probe(args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 3: the probe's epochs (common.probes.train_one_epoch, then the ACC/ASR evaluation every epoch) on
    device-resident random features of the encoder's dimension; one untimed warm-up epoch first."""
    dim = feature_dim_of(args.arch, args.width)
    generator = torch.Generator().manual_seed(args.seed)

    def labels(count: int) -> torch.Tensor:
        return torch.randint(args.probe_classes, (count,), generator=generator).to(device)

    features, test, triggered = (random_features(count, dim, generator, device)[None] for count in
                                 (args.probe_features, args.probe_test_features, args.probe_test_features))
    train_labels, test_labels = labels(args.probe_features), labels(args.probe_test_features)
    group = OneProbe(MLPProbe(dim, (512, 256), args.probe_classes)).to(device)
    optimizer = probes.probe_optimizer(group.parameters(), 1e-4, device)  # the stage's own Adam
    target = min(GTSRB_PRIORITY, args.probe_classes - 1)

    def train(epochs: int) -> list[dict]:
        return probe_epochs(group, optimizer, (features, train_labels), (test, triggered, test_labels), target,
                            args.probe_batch_size, epochs)
    return probe_figures(train, args, device)


def probe_epochs(group, optimizer: torch.optim.Optimizer, train: tuple, test: tuple, target: int, batch_size: int,
                 epochs: int) -> list[dict]:
    """Stage 3's work per epoch, `epochs` times: one epoch of the probes (common.probes.train_one_epoch) and their
    ACC/ASR evaluation (evaluation.probe.evaluate), without the stage's files and lines; the last metrics."""
    metrics = []
    for epoch in range(1, epochs + 1):
        probes.train_one_epoch(group, optimizer, *train, batch_size, epoch)
        metrics = evaluate(group, *test, target)
    return metrics


GROUP_SIZES = (3, 10)  # encoders per stage-3 run, as the pipeline's settings have them (3 + the baselines)


def bench_probe_group(args: argparse.Namespace, device: torch.device, disable: bool) -> dict:
    """Stage 3 with several encoders: N probes trained as one group (one stacked model, ProbeGroup) against the
    same N probes trained one after the other (each a group of one, OneProbe), side by side on the same random features, for
    N in GROUP_SIZES. `probe_group_speedup[N]` is the ratio of their times over --probe_measure_epochs epochs
    (each side after one untimed warm-up epoch when --warmup is set)."""
    dim = feature_dim_of(args.arch, args.width)
    generator = torch.Generator().manual_seed(args.seed)
    target = min(GTSRB_PRIORITY, args.probe_classes - 1)

    def features() -> torch.Tensor:
        return random_features(args.probe_features, dim, generator, device)
    labels = torch.randint(args.probe_classes, (args.probe_features,), generator=generator).to(device)
    test, triggered = (random_features(args.probe_test_features, dim, generator, device) for _ in range(2))
    test_labels = torch.randint(args.probe_classes, (args.probe_test_features,), generator=generator).to(device)

    def timed(train: Callable[[int], object]) -> float:
        with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
            if args.warmup:
                train(1)
            synchronize(device)
            start = time.perf_counter()
            train(args.probe_measure_epochs)
            synchronize(device)
        return time.perf_counter() - start

    speedup, group_epoch = {}, {}
    for size in GROUP_SIZES:
        train = torch.stack([features() for _ in range(size)])  # (N, T, d)
        stacked = (torch.stack([test] * size), torch.stack([triggered] * size), test_labels)
        members = [MLPProbe(dim, (512, 256), args.probe_classes) for _ in range(size)]
        singles = 0.0
        for k, probe in enumerate(members):
            single = OneProbe(copy.deepcopy(probe)).to(device)
            optimizer = probes.probe_optimizer(single.parameters(), 1e-4, device)
            singles += timed(lambda epochs: probe_epochs(single, optimizer, (train[k:k + 1], labels),
                                                         (test[None], triggered[None], test_labels), target,
                                                         args.probe_batch_size, epochs))
        group = ProbeGroup(members, [torch.Generator(device).manual_seed(k) for k in range(size)]).to(device)
        optimizer = probes.probe_optimizer(group.parameters(), 1e-4, device)
        together = timed(lambda epochs: probe_epochs(group, optimizer, (train, labels), stacked, target,
                                                     args.probe_batch_size, epochs))
        speedup[str(size)] = singles / together
        group_epoch[str(size)] = together / args.probe_measure_epochs
    return {'probe_group_speedup': speedup, 'probe_group_epoch_s': group_epoch}


def bench_visual(args: argparse.Namespace, device: torch.device) -> dict:
    """A real-world family at its input size (random weights): the tower's feature pass, as stage 3 encodes a
    downstream set, and one MIMIC distillation step (defences.mimic.distillation_losses, backward, Adam), each timed
    over --steps steps after --warmup, on random normalised 224-pixel views."""
    teacher = to_channels_last(VisualEncoder(args.arch).to(device), device).eval().requires_grad_(False)
    student = to_channels_last(VisualEncoder(args.arch).to(device), device).train()
    size, generator = teacher.input_size, torch.Generator().manual_seed(args.seed)

    def views(batch: int) -> torch.Tensor:
        x = torch.randn(batch, 3, size, size, generator=generator).to(device)  # (B, 3, 224, 224)
        return x.contiguous(memory_format=torch.channels_last) if device.type == 'cuda' else x

    def timed(step: Callable[[], object]) -> float:
        for _ in range(args.warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / args.steps

    x = views(args.visual_batch_size)

    @torch.no_grad()
    def encode() -> None:
        with autocast(device, args.amp):
            teacher.f(x)
    feature_s = timed(encode)

    run_args = stage_args(mimic_steps, args, args.mimic_batch_size, device)
    optimizer = torch.optim.Adam(student.parameters(), lr=run_args.lr, weight_decay=1e-6)
    opt_weights, _, _ = layer_weights([1.0] * 4, [run_args.opt1, run_args.opt2, run_args.opt3, run_args.opt4])
    x1, x2 = views(args.mimic_batch_size), views(args.mimic_batch_size)

    def distil() -> None:
        loss, _ = mimic_steps.distillation_losses(student, teacher, x1, x2, opt_weights, run_args.opt5, run_args.knn_t,
                                            precision=lambda: autocast(device, args.amp))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step_s = timed(distil)
    return {'visual_feature_img_per_s': args.visual_batch_size / feature_s,
            'visual_mimic_img_per_s': args.mimic_batch_size / step_s, 'visual_mimic_step_s': step_s,
            'input_size': size, 'feature_dim': FAMILIES[args.arch].feature_dim}


@torch.no_grad()
def bench_knn(args: argparse.Namespace, device: torch.device, encode_img_per_s: float) -> dict:
    """The stage-0 kNN monitor (evaluation.features.knn_monitor): encoding the CIFAR10 train and test images, at
    the measured encode throughput, plus knn_classify of --knn_queries random features against a bank of
    --knn_bank, scaled linearly to the 10000 test images."""
    dim = feature_dim_of(args.arch, args.width)
    generator = torch.Generator().manual_seed(args.seed)
    bank = random_features(args.knn_bank, dim, generator, device)
    bank_labels = torch.randint(10, (args.knn_bank,), generator=generator).to(device)
    queries = random_features(args.knn_queries, dim, generator, device)
    knn_k = min(200, args.knn_bank)  # the monitor's k
    knn_classify(bank, bank_labels, queries[:64], 10, knn_k, 0.5)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    knn_classify(bank, bank_labels, queries, 10, knn_k, 0.5)
    synchronize(device)
    classify_seconds = (time.perf_counter() - start) * CIFAR10_TEST / args.knn_queries
    return {'knn_monitor_s': (CIFAR10_TRAIN + CIFAR10_TEST) / encode_img_per_s + classify_seconds,
            'knn_classify_s': classify_seconds}


# ----------------------------------------------------------------------------------------------- context

def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(checkout: Path = REPO) -> str | None:
    """`git rev-parse --short HEAD` of a checkout (this repository by default), with '+dirty' when tracked
    files differ from it; None when it is not a git checkout (read-only git calls)."""
    def git(*command: str) -> str:
        return subprocess.run(['git', '--no-optional-locks', *command], cwd=checkout, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git('rev-parse', '--short', 'HEAD')
        return commit + ('+dirty' if git('status', '--porcelain', '--untracked-files=no') else '')
    except (OSError, subprocess.SubprocessError):
        return None


def paper_estimates(figures: dict, args: argparse.Namespace) -> dict:
    """Seconds per stage of the paper's configuration, extrapolated from the measured throughput.

    stage 0: 1000 epochs of 195 batches of 256 CIFAR10 images, plus the kNN monitor after each epoch;
    stage 1: 200 epochs of 195 batches of 256 shadow images, plus f0's feature pass over the 50000 images;
    stage 2: the MI estimation (mi_estimation_s) plus 1000 epochs of 15 batches of 128 of the 2000 images;
    stage 3: the probe (downstream_s) plus the feature pass over the train, test and triggered test images.
    """
    def epoch_images(batch: int, images: int) -> int:
        return images // batch * batch  # the last partial batch is dropped

    stage0_epoch = (epoch_images(PAPER['batch_size'], CIFAR10_TRAIN) / figures['simclr_img_per_s']
                    + figures['knn_monitor_s'])
    stage1_epoch = epoch_images(PAPER['badencoder_batch_size'], CIFAR10_TRAIN) / figures['badencoder_img_per_s']
    stage2_epoch = epoch_images(PAPER['mimic_batch_size'], PAPER['clean_images']) / figures['mimic_img_per_s']
    return {
        'stage0_epoch_s': stage0_epoch,
        'stage0_s': PAPER['stage0_epochs'] * stage0_epoch,
        'stage1_s': PAPER['stage1_epochs'] * stage1_epoch + CIFAR10_TRAIN / figures['encode_img_per_s'],
        'stage2_s': figures['mi_estimation_s'] + PAPER['stage2_epochs'] * stage2_epoch,
        'stage3_s': (figures['downstream_s']
                     + (args.probe_features + 2 * args.probe_test_features) / figures['encode_img_per_s']),
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model()


# -------------------------------------------------------------------------------------------------- main

def image_pool(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images (uint8 (N, 32, 32, 3)) and labels, enough for every stage's measurement."""
    pool = max(images_needed(args.batch_size, args), images_needed(args.badencoder_batch_size, args) + 1,
               images_needed(args.mimic_batch_size, args), args.mi_images)
    return make_synthetic('synthetic_shapes', pool, seed=args.seed)


def benchmark(args: argparse.Namespace, device: torch.device) -> dict:
    disable = args.no_progress or os.environ.get('TQDM_DISABLE') == '1'
    if args.arch in FAMILIES:
        return bench_visual(args, device)
    images, _ = image_pool(args)
    figures = {}
    for stage, run in (('stage 0: SimCLR', lambda: bench_simclr(images, args, device, disable)),
                       ('stage 1: BadEncoder', lambda: bench_badencoder(images, args, device, disable)),
                       ('stage 2: MIMIC distillation', lambda: bench_mimic(images, args, device, disable)),
                       ('stage 2: MI estimation', lambda: bench_mi(images, args, device, disable)),
                       ('stage 2: baseline defences', lambda: bench_defences(images, args, device, disable)),
                       ('stage 3: downstream probe', lambda: bench_probe(args, device, disable)),
                       ('stage 3: probe groups', lambda: bench_probe_group(args, device, disable)),
                       ('stage 0: kNN monitor', lambda: bench_knn(args, device, figures['encode_img_per_s']))):
        start = time.perf_counter()
        figures.update(run())
        print(f'{stage}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
    return figures


def context(args: argparse.Namespace, device: torch.device, wall_seconds: float) -> dict:
    """Where and how a line was measured."""
    return {'device': str(device), 'device_name': device_name(device), 'cpu_model': cpu_model(),
            'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'arch': args.arch, 'amp': args.amp and device.type == 'cuda', 'quick': args.quick,
            'warmup_steps': args.warmup, 'steps': args.steps, 'commit': git_commit(), 'wall_s': wall_seconds}


def report(figures: dict, args: argparse.Namespace, device: torch.device, wall_seconds: float) -> dict:
    """The JSON line: the five figures first, then the forward counts, the derived figures and the context (a
    real-world family's line: its figures, batches and the context)."""
    if args.arch in FAMILIES:
        return {**figures, 'batch_size': {'feature': args.visual_batch_size, 'mimic': args.mimic_batch_size},
                **context(args, device, wall_seconds)}
    extrapolated = extrapolated_figures(args)
    return {
        **{key: figures[key] for key in FIGURES},
        **{key: figures[key] for key in ('mimic_student_forwards_per_step', 'mimic_teacher_forwards_per_step',
                                         'mi_network_passes_per_image', 'simclr_forwards_per_step',
                                         'badencoder_encoder_forwards_per_step', 'encode_img_per_s',
                                         'knn_monitor_s', 'knn_classify_s', 'mi_cache_s', 'mi_epoch_s',
                                         'probe_epoch_s')},
        **{key: figures[key] for key in ('defence_s', 'defence_img_per_s', 'defence_images',
                                         'probe_group_speedup', 'probe_group_epoch_s')},
        'paper_estimate_s': paper_estimates(figures, args),
        'extrapolated': extrapolated + ['knn_monitor_s', 'paper_estimate_s'],
        'device': str(device), 'device_name': device_name(device), 'cpu_model': cpu_model(),
        'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
        'arch': args.arch, 'width': args.width, 'amp': args.amp and device.type == 'cuda', 'compile': args.compile,
        'augment': 'tensor' if use_tensor_augment(args, device) else 'pil', 'num_workers': args.num_workers,
        'quick': args.quick, 'warmup_steps': args.warmup, 'steps': args.steps,
        'batch_size': {'simclr': args.batch_size, 'badencoder': args.badencoder_batch_size,
                       'mimic': args.mimic_batch_size, 'mi': args.mi_batch_size, 'probe': args.probe_batch_size},
        'mi_images': args.mi_images, 'mi_epochs': args.mi_epochs, 'mi_epochs_measured': args.mi_measure_epochs,
        'probe_features': args.probe_features, 'probe_test_features': args.probe_test_features,
        'probe_classes': args.probe_classes, 'probe_epochs': args.probe_epochs,
        'probe_epochs_measured': args.probe_measure_epochs, 'knn_bank': args.knn_bank,
        'knn_queries_measured': args.knn_queries, 'commit': git_commit(), 'wall_s': wall_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    resolve_counts(args)
    seed_everything(args.seed)
    device = resolve_device(args.device, args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # whatever the stages print: stdout is the JSON line only
        figures = benchmark(args, device)
    print(json.dumps(report(figures, args, device, time.perf_counter() - start)), flush=True)


if __name__ == '__main__':
    run_main(main)
