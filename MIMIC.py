"""Stage 2 — MIMIC: distil a clean student from a suspect (backdoored) encoder (docs/DESIGN.md §6).

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

The paper's ablations are one flag each: `--layer_weights uniform` (no MI step, equal layer weights),
`--no_attention`, `--no_clone`, `--no_contrastive` (see defences/mimic.py).

Writes to --results_dir: args.json, mi.json (MI per layer, weights, opt values), log.csv (one row per
epoch) and the checkpoints. `--resume` continues the latest checkpoint; the MI step is not repeated.

Under `torchrun --nproc_per_node N MIMIC.py ...` the distillation runs on N processes (--batch_size is the global
batch; common/distributed.py); the MI step runs once, in rank 0, and its layer weights are sent to the others.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import distributed
from common.cli import check_save_freq, print_args, progress_disabled, require_positive, seed_everything
from common.runs import prepare_results_dir, write_args, write_json
from core.cli import resume_flags, run_main
from core.errors import UsageError
from datasets.fastpath import maybe_compile
from defences.mimic import (build_student, distillation_modes, distillation_step, get_args_parser, load_clean_subset,
                            load_mi_images, load_suspect_for, locate_benign_knowledge, report_weights,
                            uniform_layer_weights)
from defences.training import DefenceRun, Phase
from models import SimCLR, encoder_input_size, encoder_normalization

CHECKPOINT_PATTERN = 'model{}.pth'


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, refused before anything is loaded or written (docs/DESIGN.md §11)."""
    if not 0 < args.ratio <= 1:
        raise UsageError(f'--ratio must lie in (0, 1], got {args.ratio}')
    if not args.teacher:
        raise UsageError('--teacher is required: the suspect encoder checkpoint to purify')
    if not args.results_dir:
        raise UsageError('--results_dir is required: the folder where the student and logs are written')
    require_positive('--epochs', args.epochs)
    require_positive('--mi_epochs', args.mi_epochs)
    check_save_freq(args.save_freq)
    if args.no_attention and args.no_clone and args.no_contrastive:
        raise UsageError('--no_attention, --no_clone and --no_contrastive together leave no loss to train on')
    if args.batch_size < 2:
        raise UsageError(f'--batch_size must be at least 2 (contrastive loss, BatchNorm), got {args.batch_size}')


def layer_weights_once(args: argparse.Namespace, run: DefenceRun, teacher: SimCLR, student: SimCLR, info,
                       clean) -> dict:
    """{'opt': attention weights per layer, 'mi': MI per layer} from the MI of each tapped layer (docs/DESIGN.md
    §6.1-6.2), or uniform with --layer_weights uniform: computed once before distillation (writing mi.json), in
    rank 0 under torchrun; a resumed run takes those its checkpoint recorded."""
    base = [args.opt1, args.opt2, args.opt3, args.opt4]

    def compute() -> dict:
        if args.layer_weights == 'uniform':
            report = uniform_layer_weights(base)
            report_weights(report, args.mi_model)
            write_json(run.results_dir / 'mi.json', {'mi_model': None, 'layer_weights': 'uniform', **report})
            return {'opt': report['opt'], 'mi': {}}
        measured = teacher if args.mi_model == 'teacher' else student
        mi_images, mi_source = load_mi_images(args, info, clean, encoder_input_size(measured))
        if args.mi_data != 'subset':
            print(f'MI step on {len(mi_images)} images of {mi_source} (--mi_data {args.mi_data})')
        report = locate_benign_knowledge(measured, mi_images, run.normalization, base=base, mi_epochs=args.mi_epochs,
                                         batch_size=args.batch_size, seed=args.seed, device=run.device,
                                         disable_progress=progress_disabled(args))
        report_weights(report, args.mi_model)
        write_json(run.results_dir / 'mi.json', {'mi_model': args.mi_model, 'layer_weights': 'mi',
                                                 'mi_data': {'source': mi_source, 'images': len(mi_images)}, **report})
        return {'opt': report['opt'], 'mi': report['mi']}
    weights = run.once(('opt', 'mi'), compute, CHECKPOINT_PATTERN)
    return {'opt': list(weights['opt']), 'mi': weights['mi']}


def distillation_phase(args: argparse.Namespace, student: SimCLR, teacher: SimCLR, optimizer: torch.optim.Optimizer,
                       device: torch.device, weights: dict) -> Phase:
    """The distillation as a training phase: L = L_con + Σ_l opt_l · AT_l + opt5 · L_clone (docs/DESIGN.md §6.3),
    with the terms the ablation flags switch off at weight 0; its checkpoints record the layer weights."""
    student_forward, teacher_forward = maybe_compile(student, args.compile), maybe_compile(teacher, args.compile)
    attention_weights = [0.0] * len(weights['opt']) if args.no_attention else weights['opt']
    opt5 = 0.0 if args.no_clone else args.opt5
    step_loss = distillation_step(student_forward, teacher_forward, attention_weights, opt5, args.knn_t, device,
                                  args.amp, contrastive_weight=0.0 if args.no_contrastive else 1.0)
    return Phase('Distill', student, optimizer, step_loss, distillation_modes(student, teacher),
                 checkpoint_pattern=CHECKPOINT_PATTERN, checkpoint_extra=weights)


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group

    # Models: the frozen teacher (with, for a real-world encoder, its file's layout) and a fresh student of its config.
    teacher, layout = load_suspect_for(args, device)
    student = build_student(teacher, args.student, device)
    if layout is not None:
        args.arch = teacher.family  # args.json and the checkpoints name the family, read off the file or not

    # Data: the clean subset D of the pre-training split (or --data_dir's images), at the teacher's input size.
    info, clean = load_clean_subset(args, encoder_input_size(teacher))
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-6)

    prepare_results_dir(args, CHECKPOINT_PATTERN)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_args(results_dir, args)
    source = f'{info.name}/{info.pretraining_split}' if layout is None else f'{args.data_dir or info.name} at {clean.shape[1]} px'
    print(f'clean subset: {len(clean)} images of {source} ({args.subset}); '
          f'teacher {teacher.config}{f" ({layout.format} layout)" if layout else ""} on {device}')

    # The layer weights (docs/DESIGN.md §6.1-6.2), once before distillation; then the distillation (§6.3).
    run = DefenceRun(args, encoder_normalization(teacher, info.normalization), device, results_dir,
                     resume_flags(parser), layout)
    weights = layer_weights_once(args, run, teacher, student, info, clean)
    if args.resume:
        print(f"layer weights of the interrupted run: opt {weights['opt']}")
    training = run.train(distillation_phase(args, student, teacher, optimizer, device, weights), clean, args.epochs)
    if training.resumed_at >= args.epochs:
        print(f'nothing to do: the run is already at epoch {training.resumed_at} of --epochs {args.epochs}')
    else:
        print(f'purified student: {results_dir / CHECKPOINT_PATTERN.format(args.epochs)}')


if __name__ == '__main__':
    run_main(main)
