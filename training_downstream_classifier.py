"""Stage 3: a downstream MLP probe on a frozen encoder, reporting ACC and ASR (docs/DESIGN.md §7).

The encoder's features f(x), L2-normalised, are computed once on the device for the downstream
training set, its test set, the triggered test set (trigger 0 on every test image, labelled with the
target) and the reference images. An MLP (d → 512 → 256 → C, dropout 0.5) is then trained on the
cached training features (Adam lr 1e-4, batch 64, fixed order, as the original), and after every
epoch it prints the original's JSON lines: clean accuracy, ASR (the fraction of ALL triggered test
images predicted as the target, as the original counts it) and ASR over the triggered images whose
true label is not the target (the stricter definition). Several --encoder: their probes are trained
together as one stacked model, each exactly as its own run (docs/DESIGN.md §7.1); one encoder is the group of one.

    # the original README's evaluation (data/gtsrb prepared first, see data/README.md)
    python training_downstream_classifier.py --encoder_usage_info cifar10 --dataset gtsrb \
        --reference_label 12 --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --reference_file reference/cifar10/priority.npz --nn_epochs 1000 \
        --encoder output/cifar10/gtsrb_backdoored_encoder/model_200.pth --results_dir output/probe
    # a quick CPU check on the offline synthetic sets
    python training_downstream_classifier.py --encoder_usage_info synthetic_shapes \
        --dataset synthetic_digits --reference_label 1 --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --encoder output/synthetic/clean_encoder/model_2.pth --nn_epochs 5 --device cpu

The metric names are those of the original: 'Clean Accuracy (CA)' and 'Attack Success Rate-Baseline
(ASR-B)' when 'clean' is in the encoder path, else 'Backdoored Accuracy (BA)' and 'Attack Success
Rate (ASR)'. With --results_dir, each encoder's folder (--results_dir itself for one encoder, --results_dir/<name>
for several) gets args.json, log.csv (every epoch's loss and metrics), probe_<epoch>.pth and metrics.json (the last
epoch's values).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.cli import (add_arch_argument, check_save_freq, data_dir_for, print_args, progress_disabled,
                        require_positive, seed_everything, shared_parser)
from common.engine import Training
from common.probes import (Member, build_group, load_members, prepare_folders, probe_normalization, probe_optimizer,
                           resume, train_one_epoch, write_checkpoints)
from common.runs import write_csv, write_json
from core.cli import SameOnResume, StageParser, resume_flags, run_main
from core.device import resolve_device
from core.errors import UsageError
from datasets import DATASETS, get_info, pretraining_names
from datasets.downstream import load_probe_data
from evaluation.metrics import metric_names, print_epoch
from evaluation.probe import evaluate, extract_features, reference_similarity
from models import USAGE_INFO_FAMILIES, encoder_input_size


def get_args_parser() -> argparse.ArgumentParser:
    parser = StageParser(description='Evaluate a clean or backdoored encoder with a downstream '
                                                 'classifier (stage 3 of the pipeline).',
                                     parents=[shared_parser()])
    same = SameOnResume(parser)  # the flags that shape the probe's training: --resume refuses other values
    same.add_argument('--dataset', default='cifar10', type=str, choices=sorted(DATASETS),
                      help='downstream dataset (default: cifar10)')
    same.add_argument('--reference_label', default=-1, type=int,
                      help='target class of the attack in the downstream task (default: -1, '
                           "take y[0] of --reference_file)")
    same.add_argument('--trigger_file', default='', type=str, metavar='PATH',
                      help='trigger file (npz with t, tm); trigger 0 is applied to the test images')
    same.add_argument('--encoder_usage_info', default='', type=str,
                      help=f"the encoder's pre-training set, which selects the input normalisation "
                           f"({', '.join(pretraining_names())}; default: the one recorded in the checkpoint), or, as the "
                           f"released code, {' or '.join(USAGE_INFO_FAMILIES)} for its real-world encoders, whose own "
                           'normalisation and 224-px input are used (the downstream images are resized to it)')
    add_arch_argument(parser)
    same.add_argument('--encoder', default='', type=str, nargs='+', metavar='PATH',
                      help='encoder checkpoint to evaluate; several: their probes are trained together, as one '
                           'stacked model, each exactly as its own run (its lines name it; --results_dir DIR '
                           'gets one folder DIR/<name> per encoder)')
    parser.add_argument('--names', default=None, nargs='+', metavar='NAME',
                        help="with several --encoder: each one's name in the printed lines and its folder under "
                             '--results_dir (default: the folder name of each encoder file)')
    same.add_argument('--lr', default=0.0001, type=float, help='Adam learning rate (default: 0.0001)')
    parser.add_argument('--nn_epochs', default=1000, type=int, help='classifier training epochs (default: 1000)')
    same.add_argument('--hidden_size_1', default=512, type=int, help='first hidden layer (default: 512)')
    same.add_argument('--hidden_size_2', default=256, type=int, help='second hidden layer (default: 256)')
    same.add_argument('--batch_size', default=64, type=int, help='classifier batch size (default: 64)')
    parser.add_argument('--reference_file', default='', type=str, metavar='PATH',
                        help='reference inputs (npz with x, y); optional, their features are compared '
                             'with those of the triggered images')
    parser.add_argument('--save_freq', default=100, type=int,
                        help='with --results_dir, save the probe as probe_<epoch>.pth every this many epochs '
                             '(0: only at the end), for --resume (default: 100)')
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, before anything is loaded (docs/DESIGN.md §11)."""
    for flag, value in (('--nn_epochs', args.nn_epochs), ('--batch_size', args.batch_size),
                        ('--hidden_size_1', args.hidden_size_1), ('--hidden_size_2', args.hidden_size_2)):
        require_positive(flag, value)
    if not args.lr > 0:
        raise UsageError(f'--lr must be positive, got {args.lr}')
    if not args.encoder:
        raise UsageError('--encoder is required: the encoder checkpoint (.pth) to evaluate')
    if not args.trigger_file:
        raise UsageError('--trigger_file is required: the trigger (.npz) whose attack success rate is measured')
    if args.encoder_usage_info and args.encoder_usage_info not in (*pretraining_names(), *USAGE_INFO_FAMILIES):
        raise UsageError(f"--encoder_usage_info '{args.encoder_usage_info}': not a pre-training set, expected "
                         f'one of {pretraining_names() + list(USAGE_INFO_FAMILIES)}')
    check_save_freq(args.save_freq)
    if args.results_dir and Path(args.results_dir).exists() and not Path(args.results_dir).is_dir():
        raise UsageError(f'--results_dir {args.results_dir}: exists and is not a folder')


def train_probes(args: argparse.Namespace, members: list[Member], num_classes: int, must_match: dict,
                 device: torch.device) -> None:
    """The probes of members whose features have one size, as one group: trained (or resumed), then each member's
    metrics.json written."""
    group = build_group(members, args, num_classes, device)
    optimizer = probe_optimizer(group.parameters(), args.lr, device)
    training = Training(group, optimizer, args, args.nn_epochs, Path(args.results_dir) if args.results_dir else None,
                        log_name=None, desc=f'Probe epochs ({len(members)} encoders)' if len(members) > 1
                        else 'Probe epochs', writer=lambda epoch: write_checkpoints(training, members, epoch))
    metrics = resume(training, members, must_match) if args.resume else [{} for _ in members]
    train, test, triggered = (torch.stack([getattr(member.features, split) for member in members])
                              for split in ('train', 'test', 'triggered'))  # (N, T, d)
    labels, test_labels = members[0].features.train_labels, members[0].features.test_labels

    def report(row: dict) -> None:  # each member's lines and log.csv
        for member, loss, values in zip(members, row['loss'], row['metrics']):
            print_epoch(row['epoch'], loss, values, metric_names(member.args.encoder), member.name)
            member.rows.append({'epoch': row['epoch'], 'loss': loss,
                                **{key: value for key, value in values.items() if key != 'epoch'}})
            if member.folder is not None:
                write_csv(member.folder / 'log.csv', member.rows)

    for epoch in training.loop():
        row = {'epoch': epoch, 'loss': train_one_epoch(group, optimizer, train, labels, args.batch_size, epoch)}
        row['metrics'] = [{**values, 'epoch': epoch}
                          for values in evaluate(group, test, triggered, test_labels, args.reference_label)]
        training.end_epoch(row, report)
        metrics = row['metrics']
    for member, member_metrics in zip(members, metrics):
        if member.folder is not None:
            write_json(member.folder / 'metrics.json',
                       {**member_metrics, 'dataset': args.dataset, 'encoder': member.args.encoder,
                        'reference_label': args.reference_label,
                        'encoder_usage_info': member.args.encoder_usage_info, **member.similarity})
            print(f"saved {member.folder / 'metrics.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args)
    seed_everything(args.seed, args.deterministic)
    device = resolve_device(args.device, args.gpu)
    members = load_members(args)
    if members[0].name is None:  # the original's run: one encoder, its arguments those of the command line
        args = members[0].args
    sizes = {encoder_input_size(member.encoder) for member in members}
    if len(sizes) > 1:
        raise UsageError('--encoder: real-world (224-px) and CIFAR-style encoders take their images at different '
                         'sizes; evaluate them in separate runs')
    data = load_probe_data(args.dataset, data_dir_for(args, get_info(args.dataset).name), args.trigger_file,
                           args.reference_file, args.reference_label, sizes.pop())
    args.reference_label = data.target
    for member in members:
        member.args.reference_label = data.target
    print_args(args)
    prepare_folders(args, members)
    for member in members:
        member.features = extract_features(member.encoder.to(device), data,
                                           probe_normalization(member.encoder, member.args), device, args.amp,
                                           progress_disabled(args))
        member.encoder = member.encoder.cpu()
        member.similarity = reference_similarity(member.features)
        if member.similarity:
            print(f'{member.name + ": " if member.name else ""}reference: mean cos(f(triggered), f(reference)) = '
                  '{reference_similarity_triggered:.4f}, mean cos(f(clean), f(reference)) = '
                  '{reference_similarity_clean:.4f}'.format(**member.similarity))
    for size in sorted({member.features.train.shape[1] for member in members}):
        # one stacked model per feature size (encoders of other widths or architectures)
        train_probes(args, [member for member in members if member.features.train.shape[1] == size],
                     data.num_classes, resume_flags(parser), device)


if __name__ == '__main__':
    run_main(main)
