"""Stage 2, the baselines: purify a suspect encoder with one of the eight defences MIMIC is compared with.

Every defence works under MIMIC's threat model: the suspect encoder (`--teacher`, the flag MIMIC.py uses) and
a small clean, unlabelled subset D of its pre-training set (`--ratio`, `--subset`: the same images MIMIC.py
takes), nothing else. The methods live in `defences/` (one module each; its docstring gives the paper, the
published recipe and what was adapted to the label-free setting):

    ft      fine-tuning: SimCLR (NT-Xent) training of the suspect on D
    fp      Fine-Pruning (RAID 2018): prune layer4's least active channels until the features' agreement with the
            suspect's drops, then fine-tune
    nad     Neural Attention Distillation (ICLR 2021): fine-tuned teacher, NT-Xent + attention distillation
    clp     Channel Lipschitzness-based Pruning (ECCV 2022): data-free, prunes high-Lipschitz channels
    anp     Adversarial Neuron Pruning (NeurIPS 2021): masks learnt against adversarial BN perturbations, NT-Xent on D
    kd      plain knowledge distillation into a fresh student (CVPR 2022): no attention, no MI
    invert  DECREE's trigger inversion and verdict (CVPR 2023), then trigger-augmented fine-tuning
    sslcleanse  SSL-Cleanse's mitigation (ECCV 2024) after DECREE's inversion: distillation from a frozen copy of
            the suspect

    python baseline_defence.py --defence fp --teacher runs/backdoor/model_200.pth --pretraining_dataset cifar10 \
        --ratio 0.04 --epochs 100 --results_dir runs/fp
    # offline, on the synthetic set
    python baseline_defence.py --defence clp --teacher <encoder.pth> --pretraining_dataset synthetic_shapes \
        --results_dir /tmp/clp --device cpu

Writes to --results_dir: args.json, log.csv (defences that train; NAD also teacher_log.csv), the purified
encoder model_<epochs>.pth (model_0.pth for clp and anp, which train no weight) — a plain SimCLR state_dict
that stage 3, MIMIC.py and the original code load — and, last, defence.json: what the defence did (channels
pruned per layer, the inverted trigger's size, epochs, images used) and its wall-clock seconds. `--resume`
continues a defence that trains from its latest checkpoint.

Under `torchrun --nproc_per_node N baseline_defence.py ...` the defences that train (ft, fp, nad, kd, invert,
sslcleanse) train on N processes (--batch_size is the global batch; common/distributed.py); what fp, invert and
sslcleanse compute before training (the pruning mask, the inverted trigger) is computed once, in rank 0, and sent to the others; clp and
anp, which train no weight, run in rank 0 alone.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import distributed
from common.cli import check_save_freq, print_args, require_positive, seed_everything
from common.runs import checkpoint_epochs, write_args, write_json
from core import processes
from core.cli import resume_flags, run_main
from core.errors import UsageError
from datasets import get_info
from defences import BASELINES, TRAINING_BASELINES, get_defence
from defences.baselines import DEFAULT_LR, get_args_parser
from defences.mimic import load_clean_subset, load_suspect_for
from defences.training import DefenceRun
from models import encoder_input_size, encoder_normalization

CHECKPOINT_PATTERNS = ('model_{}.pth', 'teacher_{}.pth')


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, refused before anything is loaded or written (docs/DESIGN.md §11)."""
    if not args.teacher:
        raise UsageError('--teacher is required: the suspect encoder checkpoint to purify')
    if not args.results_dir:
        raise UsageError('--results_dir is required: the folder where the purified encoder and logs are written')
    if not 0 < args.ratio <= 1:
        raise UsageError(f'--ratio must lie in (0, 1], got {args.ratio}')
    require_positive('--epochs', args.epochs)
    if args.batch_size < 2:
        raise UsageError(f'--batch_size must be at least 2 (contrastive loss, BatchNorm), got {args.batch_size}')
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f'--lr must be positive, got {args.lr}')
    check_save_freq(args.save_freq)
    for name in BASELINES:
        module = get_defence(name)
        if hasattr(module, 'check'):
            module.check(args)


def prepare_results_dir(args: argparse.Namespace) -> None:
    """Create --results_dir; refuse to clobber an earlier run's files; --resume needs a checkpoint to continue."""
    results_dir = Path(args.results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise UsageError(f'--results_dir {results_dir}: exists and is not a folder')
    existing = [path for pattern in CHECKPOINT_PATTERNS for _, path in checkpoint_epochs(results_dir, pattern)] \
        if results_dir.is_dir() else []
    if args.resume and not existing:
        raise UsageError(f'--resume: no checkpoint (model_<epoch>.pth, teacher_<epoch>.pth) in {results_dir}')
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f'--results_dir {results_dir}: already holds {existing[-1].name} from an earlier run; '
                         'pass --resume to continue it or --overwrite to replace it')
    if (results_dir / 'defence.json').exists() and not (args.resume or args.overwrite):
        raise UsageError(f'--results_dir {results_dir}: already holds defence.json from an earlier run; pass '
                         '--overwrite to replace it')
    results_dir.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args)
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.defence, 1e-3)
    seed_everything(args.seed, args.deterministic)
    device = distributed.setup(args)  # resolve_device(--device, --gpu); under torchrun also joins the group

    # Data: the clean subset D of the pre-training split (MIMIC.py's), normalised as the suspect expects; none
    # for a data-free defence (clp), which reads no image and so checks no data size.
    defence = get_defence(args.defence)
    suspect, layout = load_suspect_for(args, device)  # frozen, eval mode; a real-world encoder's file layout
    if layout is not None:
        if getattr(defence, 'CIFAR_ONLY', None):
            raise UsageError(f'--defence {args.defence} supports only the CIFAR-style SimCLR: {defence.CIFAR_ONLY}; '
                             f'{args.teacher} is a {suspect.family} encoder')
        args.arch = suspect.family  # args.json names the family
    info, clean = load_clean_subset(args, encoder_input_size(suspect)) if defence.READS_IMAGES \
        else (get_info(args.pretraining_dataset), None)
    trains = args.defence in TRAINING_BASELINES
    if not trains and not processes.is_main():
        return  # clp and anp train no weight: under torchrun rank 0 runs them alone

    prepare_results_dir(args)
    results_dir = Path(args.results_dir)
    print_args(args)
    write_args(results_dir, args)
    data = f'{len(clean)} clean images of {info.name}/{info.pretraining_split} ({args.subset})' \
        if clean is not None else 'data-free, no image read'
    print(f'{args.defence} ({defence.PAPER}): {data}; suspect {suspect.config} on {device}')

    start = time.perf_counter()
    run = DefenceRun(args, encoder_normalization(suspect, info.normalization), device, results_dir,
                     resume_flags(parser), layout)
    purified, report = defence.purify(suspect, clean, run)
    checkpoint = results_dir / f'model_{args.epochs if trains else 0}.pth'
    if not trains:  # the defences that train saved their last epoch already
        run.save(purified, checkpoint, defence=args.defence)
    write_json(results_dir / 'defence.json', {
        'defence': args.defence, 'paper': defence.PAPER, 'checkpoint': checkpoint.name,
        'images': 0 if clean is None else len(clean),
        'seconds': round(time.perf_counter() - start, 2), 'resumed': bool(args.resume), **report})
    print(f'purified encoder: {checkpoint}')


if __name__ == '__main__':
    run_main(main)
