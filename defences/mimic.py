"""MIMIC (Han et al., "Mutual Information Guided Backdoor Mitigation for Pre-trained Encoders", IEEE TIFS
2025) as a defence of stage 2 (`purify`, as every baseline), its steps and the flags of `MIMIC.py` (docs/DESIGN.md
§6).

1. Locate benign knowledge: the mutual information between each tapped layer of the teacher and its
   representation, estimated with MINE on the clean subset D (§6.1), turned into attention weights
   opt_l = base_l + 10000·MI_l/Σ MI (§6.2).
2. Distil a freshly initialised student from the frozen teacher on augmented views of D (§6.3):
       L = c_con·L_con + Σ_l opt_l · AT(S_l(x1), T_l(x1)) + opt5 · L_clone
   with c_con = 1. The ablations of the paper each switch one part off: uniform layer weights instead of
   the MI (`layer_weights(..)` with equal MI), no attention loss (opt_l = 0), no clone loss (opt5 = 0),
   no contrastive loss (c_con = 0). A term whose weight is 0 is not computed at all.

Plain knowledge distillation (the `kd` baseline) is the same loss with only the clone term left.

Under torchrun (common/distributed.py) the MI step runs once, in rank 0 (`layer_weights_once`), and the distillation step
trains the student through DistributedDataParallel: the NT-Xent takes its negatives from the global batch, and
the attention and clone terms, means over the samples, average over the processes to the global batch's.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.cli import data_dir_for, require_positive, shared_parser
from common.engine import train_steps
from common.runs import write_json
from core.cli import SameOnResume, StageParser
from core.device import autocast
from core.errors import UsageError
from datasets import get_info, load_images, normalize_batch
from datasets.fastpath import add_speed_arguments, maybe_compile, to_channels_last
from models import (TAPPED_LAYERS, CheckpointError, SimCLR, VisualEncoder, build_encoder, encoder_input_size,
                    load_any_encoder)
from models.losses import attention_transfer, negative_cosine
from models.mutual_info import NonFiniteCounts, estimate_mi, layer_weights, nonfinite_warning

from .stage import add_defence_arguments, select_images
from .training import DefenceRun, Phase


LAYER_NAMES = tuple(f'layer{index}' for index in TAPPED_LAYERS)  # keyed by the index in f.f (docs/DESIGN.md §3)
RESNET_STAGES = {f'layer{index}': f'f.f.{index} (ResNet layer{stage})'
                 for stage, index in enumerate(TAPPED_LAYERS, start=1)}


MI_DATA = ('subset', 'labelled')
LABELLED_SPLIT = 'train'  # the labelled training split of every pre-training set (STL10: 5000 images)


def load_mi_images(args, info, clean: np.ndarray, image_size: int | None = None) -> tuple[np.ndarray, str]:
    """(the images the MI step is measured on, where they come from), chosen by --mi_data:

    - `subset` (the paper, our default): D itself, the images the student is distilled on;
    - `labelled` (the released code): --ratio/--subset of the pre-training set's *labelled* training split, in
      the released MIMIC.py the first ratio·5000 of STL10's `train` images while D is ratio·100000 of its
      unlabeled ones. For CIFAR10 (and the synthetic set) that split is the pre-training split: the same images
      as `subset`. Fewer images than one batch are accepted here (the estimator's last batch is partial, as
      the released loader's), at least 2 are needed.
    """
    source = f'{info.name}/{info.pretraining_split}'
    if args.mi_data == 'subset' or info.pretraining_split == LABELLED_SPLIT:
        return clean, source
    images = load_images(info.name, LABELLED_SPLIT, data_dir_for(args, info.name), image_size)
    source = f'{info.name}/{LABELLED_SPLIT}'
    count = int(args.ratio * len(images))
    if count < 2:
        raise UsageError(f'--mi_data labelled: --ratio {args.ratio} gives {count} of the {len(images)} images of '
                         f'{source}; the MI step needs at least 2')
    return select_images(images, count, args.subset, args.seed), source


def build_student(teacher: torch.nn.Module, student_path: str, device: torch.device) -> torch.nn.Module:
    """A freshly initialised encoder of the teacher's config (a SimCLR, or a real-world encoder of its family), or
    --student's weights (same config)."""
    if not student_path:
        return to_channels_last(build_encoder(teacher.config).to(device), device)
    student, _ = load_any_encoder(student_path, teacher.config.get('family'))
    if student.config != teacher.config:
        raise CheckpointError(f'{student_path}: the student is {student.config} but the teacher is '
                              f'{teacher.config}; they must have the same architecture')
    return to_channels_last(student.to(device), device)


MI_INPUTS = 64 * 32 * 32  # the largest tap of the paper's CIFAR ResNet18 (layer1: 64 x 32 x 32)


def mi_pool_size(channels: int, height: int, width: int, max_inputs: int = MI_INPUTS) -> int:
    """The side s of the square map a real-world encoder's tap is average-pooled to before the MI step (§6.1):

        s = min(⌊√(max_inputs / C)⌋, H, W)

    the largest s with C·s² ≤ max_inputs = 65,536, and never larger than the tap itself. CLIP RN50 at 224 px:
    256x56x56 → 16 (65,536 inputs), 512x28x28 → 11, 1024x14x14 → 8, 2048x7x7 → 5. The released code flattens
    each tap whole: 802,816 inputs for layer1, a statistics network of 411M weights (docs/DESIGN.md §15.1).
    """
    return max(1, min(math.isqrt(max_inputs // channels), height, width))


def mi_input(tap: torch.Tensor, pooled: bool) -> torch.Tensor:
    """A tap (B, C, H, W) flattened for the statistics network: (B, C·s²) after adaptive average pooling to
    `mi_pool_size` when `pooled` (a real-world encoder), else (B, C·H·W) as it is (a CIFAR SimCLR, as the paper)."""
    if pooled:
        side = mi_pool_size(*tap.shape[1:])
        if (side, side) != tuple(tap.shape[2:]):
            tap = F.adaptive_avg_pool2d(tap, side)  # (B, C, s, s)
    return torch.flatten(tap, start_dim=1)


@torch.no_grad()
def tapped_representations(model: SimCLR, images: np.ndarray, normalization, batch_size: int,
                           device: torch.device, disable_progress: bool = False,
                           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One eval-mode pass over the un-augmented images (docs/DESIGN.md §6.1): flattened tapped-layer outputs
    [(N, C_l·H_l·W_l) for each l; a real-world encoder's pooled first, `mi_input`] and the normalised feature z
    (N, d), all left on `device`.

    The network is frozen and D is not augmented, so these pairs are fixed and computed once.
    """
    pooled = isinstance(model, VisualEncoder)
    was_training = model.training
    model.eval()
    taps, features = [[] for _ in TAPPED_LAYERS], []
    for start in tqdm(range(0, len(images), batch_size), desc='Caching tapped layers', leave=False,
                      disable=disable_progress):
        x = normalize_batch(images[start:start + batch_size], normalization, device)  # (B, 3, H, W)
        feature, _, batch_taps = model(x, return_taps=True)  # (B, d), [(B, C_l, H_l, W_l)]
        features.append(feature)
        for cache, tap in zip(taps, batch_taps):
            cache.append(mi_input(tap, pooled))  # (B, C_l·H_l·W_l), or (B, C_l·s_l²) pooled
    model.train(was_training)
    return [torch.cat(cache) for cache in taps], torch.cat(features)


def locate_benign_knowledge(model: SimCLR, images: np.ndarray, normalization, *, base: list[float],
                            mi_epochs: int, batch_size: int, seed: int, device: torch.device,
                            disable_progress: bool = False) -> dict:
    """MI between each tapped layer and the representation, and the attention weights (docs/DESIGN.md §6.1-6.2).

    Returns {'mi': {layer: MI}, 'weights': [w_l], 'opt': [opt_l], 'fell_back': bool, 'history': ...,
    'nonfinite': {layer: batch estimates that were NaN or ±inf, counted as 0}, 'nonfinite_losses': {layer: training
    losses that were}}.
    """
    taps, z = tapped_representations(model, images, normalization, batch_size, device, disable_progress)
    generator = torch.Generator().manual_seed(seed)  # the permutations of the DV marginal term
    mi, history, counts = {}, {}, {}
    for name, h in zip(LAYER_NAMES, taps):
        counts[name] = NonFiniteCounts()
        with tqdm(total=mi_epochs, desc=f'MI {name}', disable=disable_progress) as bar:
            def on_epoch(epoch: int, estimate: float, bar=bar) -> None:
                bar.set_postfix(mi=f'{estimate:.4f}')
                bar.update(1)
            mi[name], history[name] = estimate_mi(h, z, epochs=mi_epochs, batch_size=batch_size,
                                                  generator=generator, on_epoch=on_epoch, nonfinite=counts[name])
    opt, weights, fell_back = layer_weights([mi[name] for name in LAYER_NAMES], base)
    return {'mi': mi, 'weights': weights, 'opt': opt, 'base': list(base), 'fell_back': fell_back,
            'layers': tapped_layer_names(model), 'history': history,
            'nonfinite': {name: c.total_estimates for name, c in counts.items()},
            'nonfinite_losses': {name: c.total_losses for name, c in counts.items()}}


def tapped_layer_names(model: torch.nn.Module) -> dict[str, str]:
    """{layer3..layer6: the module it is}: f.f.3 .. f.f.6 of a CIFAR SimCLR, visual.layer1 .. visual.layer4 of a
    real-world encoder."""
    if not isinstance(model, VisualEncoder):
        return RESNET_STAGES
    return {name: module for name, module in zip(LAYER_NAMES, model.tapped_modules)}


def uniform_layer_weights(base: list[float]) -> dict:
    """The "without MI guidance" ablation: no MI step, w_l = 1/L, opt_l = base_l + 10000/L (docs/DESIGN.md §6.4:
    §6.2 with equal MI). The report has the layout of `locate_benign_knowledge`'s, with no MI values."""
    opt, weights, _ = layer_weights([1.0] * len(base), base)
    return {'mi': None, 'weights': weights, 'opt': opt, 'base': list(base), 'fell_back': False,
            'layers': RESNET_STAGES, 'history': None}


def report_weights(report: dict, mi_model: str) -> None:
    if report['mi'] is None:
        print('layer weights: uniform (--layer_weights uniform, no MI step)')
    else:
        print(f'MI of each tapped layer with the representation ({mi_model}): '
              + ', '.join(f'{name} {report["mi"][name]:.4f}' for name in LAYER_NAMES))
    print('attention weights w: ' + ', '.join(f'{w:.4f}' for w in report['weights'])
          + ' -> opt: ' + ', '.join(f'{o:.1f}' for o in report['opt']))
    nonfinite, losses = report.get('nonfinite') or {}, report.get('nonfinite_losses') or {}
    for name in LAYER_NAMES:  # one line per layer whose estimation met NaN / inf
        line = nonfinite_warning(name, nonfinite.get(name, 0), losses.get(name, 0))
        if line:
            print(line, file=sys.stderr)
    if report['fell_back']:
        print('warning: every MI estimate is 0 (estimation too short, or data without structure); '
              'the layer weights fall back to uniform', file=sys.stderr)


def distillation_losses(student: SimCLR, teacher: SimCLR, x1: torch.Tensor, x2: torch.Tensor,
                        opt_weights: list[float], opt5: float, temperature: float,
                        precision: Callable[[], ContextManager] = contextlib.nullcontext,
                        contrastive_weight: float = 1.0,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = c·L_con + Σ_l opt_l·AT(S_l(x1), T_l(x1)) + opt5·L_clone on one batch of two views (docs/DESIGN.md §6.3).

    One forward of the student per view and one of the teacher (no_grad): the tapped maps come from
    those passes. (The original ran the student a second time on x1 to collect the maps: the same
    outputs and gradients, but its BatchNorm running statistics were updated twice per step; once here.)
    A term whose weight is 0 (an ablation) is neither computed nor returned, and the second view is not
    even encoded without the contrastive term. Returns the loss and its unweighted terms (loss_con,
    loss_at1..4, loss_clone).
    """
    attention = any(w != 0 for w in opt_weights)
    with precision():
        with torch.no_grad():
            feature_t, _, taps_t = teacher(x1, return_taps=True)
        feature_s, out_s1, taps_s = student(x1, return_taps=True)
        out_s2 = student(x2)[1] if contrastive_weight != 0 else None
    terms, parts = {}, []  # summed in the original's order: L_con + (Σ_l opt_l·AT_l) + opt5·L_clone
    if contrastive_weight != 0:
        terms['loss_con'] = distributed.nt_xent(out_s1.float(), out_s2.float(), temperature)  # global batch's negatives
        parts.append(contrastive_weight * terms['loss_con'])
    if attention:
        for index, (tap_s, tap_t) in enumerate(zip(taps_s, taps_t), start=1):
            terms[f'loss_at{index}'] = attention_transfer(tap_s.float(), tap_t.float())
        parts.append(sum(w * terms[f'loss_at{i}'] for i, w in enumerate(opt_weights, start=1)))
    if opt5 != 0:
        terms['loss_clone'] = negative_cosine(feature_s.float(), feature_t.float())
        parts.append(opt5 * terms['loss_clone'])
    if not parts:
        raise UsageError('every loss term is switched off: keep at least one of the contrastive, attention '
                         'and clone terms')
    loss = parts[0]
    for part in parts[1:]:
        loss = loss + part
    return loss, terms


def distillation_step(student: SimCLR, teacher: SimCLR, opt_weights: list[float], opt5: float, temperature: float,
                      device: torch.device, amp: bool = False, contrastive_weight: float = 1.0):
    """`distillation_losses` as a phase's step_loss(x1, x2) (see defences.training); `student` as the step calls
    it: under torchrun in a phase, its DistributedDataParallel wrapper (built by `DefenceRun.train` through
    `Training.parallel`)."""
    def step_loss(x1: torch.Tensor, x2: torch.Tensor):
        return distillation_losses(student, teacher, x1, x2, opt_weights, opt5, temperature,
                                   precision=lambda: autocast(device, amp), contrastive_weight=contrastive_weight)
    return step_loss


def distillation_modes(student: torch.nn.Module, teacher: torch.nn.Module) -> Callable[[], None]:
    def set_modes() -> None:
        student.train()
        teacher.eval()
    return set_modes


def train_one_epoch(student: SimCLR, teacher: SimCLR, loader, optimizer: torch.optim.Optimizer,
                    opt_weights: list[float], opt5: float, temperature: float, *, epoch: int, epochs: int,
                    device: torch.device, amp: bool = False, disable_progress: bool = False,
                    contrastive_weight: float = 1.0) -> dict:
    """One pass of distillation over the clean subset in one process (the benchmark's and the tests'; the stage
    trains through `distillation_phase`); returns the mean loss and terms of the epoch."""
    step_loss = distillation_step(student, teacher, opt_weights, opt5, temperature, device, amp, contrastive_weight)
    distillation_modes(student, teacher)()
    return train_steps(loader, optimizer, step_loss, epoch=epoch, device=device,
                       desc=f'Distill epoch {epoch}/{epochs}', disable_progress=disable_progress)


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of `MIMIC.py` (the original's command line, every flag and default), which the stage script and the
    throughput benchmark (scripts/benchmark.py) share."""
    parser = StageParser(description='MIMIC: distil a clean student from a suspect encoder '
                                     '(stage 2 of the pipeline).', parents=[shared_parser()])
    same = SameOnResume(parser)  # the flags that shape the run: --resume refuses other values
    add_defence_arguments(  # the shared flags in the original's order, with its help
        parser, ('--lr', '--batch_size', '--epochs', '--pretraining_dataset'),
        lr={'help': 'Adam learning rate of the student (default: 0.001; the README runs 1e-2)'},
        batch_size={'help': 'images per distillation step, also the MI estimator batch (default: 128)'},
        epochs={'help': 'distillation epochs over the clean subset (default: 1000)'},
        pretraining_dataset={'help': "the teacher's pre-training set: the clean subset comes from its pre-training "
                                     'split, and it fixes the normalisation (default: cifar10)'})
    for index, name in enumerate(LAYER_NAMES, start=1):
        parser.add_argument(f'--opt{index}', default=1000, type=float,
                            help=f'base attention-loss weight of {RESNET_STAGES[name]}; the MI adds up to '
                                 '10000 to it (default: 1000)')
    same.add_argument('--opt5', default=1, type=float, help='weight of the clone (feature cosine) loss (default: 1)')
    add_defence_arguments(parser, ('--knn-t',))
    parser.add_argument('--knn-k', default=200, type=int,
                        help='kept from the original command line; MIMIC has no kNN monitor (default: 200)')
    add_defence_arguments(
        parser, ('--teacher', '--encoder_usage_info'),
        teacher={'help': 'the suspect (backdoored) encoder checkpoint (required)'},
        encoder_usage_info={'help': "a real-world teacher, as the released code names it: CLIP (CLIP's RN50 image "
                                    "encoder) or imagenet (the ImageNet SimCLR ResNet-50); its normalisation and 224-px "
                                    "input replace --pretraining_dataset's (default: read off the teacher's file)"})
    same.add_argument('--student', default='', type=str, metavar='PATH',
                      help='start the student from this checkpoint (same architecture as the teacher) '
                           '(default: fresh random initialisation, as the paper)')
    add_defence_arguments(
        parser, ('--ratio', '--subset'),
        ratio={'help': 'fraction of the pre-training split used as the clean subset, in (0, 1] (default: 0.04)'})
    same.add_argument('--mi_model', default='teacher', choices=['teacher', 'student'],
                      help='network whose layers the MI is measured on: teacher, the suspect encoder (the '
                           'paper) or the freshly initialised student (the released code) (default: teacher)')
    same.add_argument('--mi_data', default='subset', choices=MI_DATA,
                      help='images the MI is measured on: subset, the clean subset D the student is distilled '
                           'on (the paper), or labelled, --ratio of the pre-training set\'s labelled train '
                           'split (the released code: for STL10 its 5000 labelled images instead of the '
                           'unlabeled ones; the same images for CIFAR10) (default: subset)')
    parser.add_argument('--mi_epochs', default=200, type=int,
                        help='training epochs of each layer\'s MI estimator (default: 200)')
    ablation = SameOnResume(parser.add_argument_group('ablations (the paper\'s; each switches one part of MIMIC off)'))
    ablation.add_argument('--layer_weights', default='mi', choices=['mi', 'uniform'],
                          help='mi: attention weights from the per-layer MI (the paper); uniform: no MI step, '
                               'every layer gets the same weight, base + 10000/4 ("without MI guidance") '
                               '(default: mi)')
    ablation.add_argument('--no_attention', action='store_true',
                          help='drop the attention-transfer loss (every opt_l = 0) ("without attention loss")')
    ablation.add_argument('--no_clone', action='store_true',
                          help='drop the clone (feature cosine) loss, as --opt5 0 ("without clone loss")')
    ablation.add_argument('--no_contrastive', action='store_true',
                          help='drop the NT-Xent loss of the student\'s two views ("without contrastive loss")')
    add_defence_arguments(parser, ('--save_freq',),
                          save_freq={'default': 1000, 'help': 'save model<epoch>.pth every this many epochs (0: only '
                                                              'at the end), and at the end (default: 1000)'})
    add_speed_arguments(parser)
    distributed.add_distributed_arguments(parser)
    return parser


# ----------------------------------------------------------------------------------------- MIMIC as a defence
PAPER = 'Han et al., Mutual Information Guided Backdoor Mitigation for Pre-trained Encoders, IEEE TIFS 2025'
READS = 'the suspect and D: D for the MI of each tapped layer, then SimCLR views of D distilled into a fresh student'
READS_IMAGES = True
TRAINS = True
CHECKPOINTS = ('model{}.pth',)  # no underscore, as the original


def check(args: argparse.Namespace) -> None:
    require_positive('--mi_epochs', args.mi_epochs)
    if args.no_attention and args.no_clone and args.no_contrastive:
        raise UsageError('--no_attention, --no_clone and --no_contrastive together leave no loss to train on')


def layer_weights_once(run: DefenceRun, teacher: SimCLR, student: SimCLR, clean: np.ndarray) -> dict:
    """{'opt': attention weights per layer, 'mi': MI per layer} from the MI of each tapped layer (docs/DESIGN.md
    §6.1-6.2), or uniform with --layer_weights uniform: computed once before distillation (writing mi.json), in
    rank 0 under torchrun; a resumed run takes those its checkpoint recorded."""
    args = run.args
    base = [args.opt1, args.opt2, args.opt3, args.opt4]

    def compute() -> dict:
        if args.layer_weights == 'uniform':
            report = uniform_layer_weights(base)
            report_weights(report, args.mi_model)
            write_json(run.results_dir / 'mi.json', {'mi_model': None, 'layer_weights': 'uniform', **report})
            return {'opt': report['opt'], 'mi': {}}
        measured = teacher if args.mi_model == 'teacher' else student
        mi_images, mi_source = load_mi_images(args, get_info(args.pretraining_dataset), clean,
                                              encoder_input_size(measured))
        if args.mi_data != 'subset':
            print(f'MI step on {len(mi_images)} images of {mi_source} (--mi_data {args.mi_data})')
        report = locate_benign_knowledge(measured, mi_images, run.normalization, base=base, mi_epochs=args.mi_epochs,
                                         batch_size=args.batch_size, seed=args.seed, device=run.device,
                                         disable_progress=run.disable_progress)
        report_weights(report, args.mi_model)
        write_json(run.results_dir / 'mi.json', {'mi_model': args.mi_model, 'layer_weights': 'mi',
                                                 'mi_data': {'source': mi_source, 'images': len(mi_images)}, **report})
        return {'opt': report['opt'], 'mi': report['mi']}
    weights = run.once(('opt', 'mi'), compute, CHECKPOINTS[0])
    return {'opt': list(weights['opt']), 'mi': weights['mi']}


def distillation_phase(run: DefenceRun, student: SimCLR, teacher: SimCLR, weights: dict) -> Phase:
    """The distillation as a training phase: L = L_con + Σ_l opt_l · AT_l + opt5 · L_clone (docs/DESIGN.md §6.3),
    with the terms the ablation flags switch off at weight 0; Adam (weight decay 1e-6, as the original); its
    checkpoints record the layer weights."""
    args = run.args
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-6)
    student_forward, teacher_forward = maybe_compile(student, args.compile), maybe_compile(teacher, args.compile)
    attention_weights = [0.0] * len(weights['opt']) if args.no_attention else weights['opt']
    opt5 = 0.0 if args.no_clone else args.opt5
    contrastive_weight = 0.0 if args.no_contrastive else 1.0

    def step(trained: torch.nn.Module):
        return distillation_step(trained, teacher_forward, attention_weights, opt5, args.knn_t, run.device, args.amp,
                                 contrastive_weight=contrastive_weight)
    # without the contrastive term the student's projection head gets no gradient, which DDP is told
    return Phase('Distill', student, optimizer, step, distillation_modes(student, teacher), forward=student_forward,
                 parallel_options={'find_unused_parameters': contrastive_weight == 0},
                 checkpoint_pattern=CHECKPOINTS[0], checkpoint_extra=weights)


def purify(suspect: SimCLR, clean: np.ndarray, run: DefenceRun) -> tuple[SimCLR, dict]:
    """MIMIC: the layer weights from the MI of the suspect's tapped layers (once), then a fresh student (or
    --student) distilled from the frozen suspect on D for --epochs."""
    args = run.args
    student = build_student(suspect, args.student, run.device)
    weights = layer_weights_once(run, suspect, student, clean)
    if args.resume:
        print(f"layer weights of the interrupted run: opt {weights['opt']}")
    training = run.train(distillation_phase(run, student, suspect, weights), clean, args.epochs)
    if training.resumed_at >= args.epochs:
        print(f'nothing to do: the run is already at epoch {training.resumed_at} of --epochs {args.epochs}')
    return student, {'epochs': args.epochs, 'layer_weights': args.layer_weights, 'opt': weights['opt']}
