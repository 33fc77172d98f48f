"""Stage 3's runs (docs/DESIGN.md §7, §7.1): the encoders a run evaluates, each a member with its own arguments,
folder, probe checkpoints and log; one encoder is a group of one (`models.probe_group.OneProbe`), several of one
feature size are trained together as `models.ProbeGroup`, each exactly as its own run; the probe's optimiser and
its epoch. The run's epoch loop is in training_downstream_classifier.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import CheckpointError, UsageError
from datasets import get_info, pretraining_names
from evaluation.probe import Features
from models import (FAMILIES, MLPProbe, ProbeGroup, VisualEncoder, encoder_normalization, load_checkpoint,
                    save_atomic)
from models.probe_group import OneProbe

from .encoders import load_encoder, recorded_pretraining_set
from .engine import Training, train_steps
from .runs import (check_resumable, checked_checkpoints, checkpoint_epochs, read_csv, restore_optimizer, rng_state,
                   set_rng_state, write_args)

PROBE_PATTERN = 'probe_{}.pth'


def encoder_usage_info(args: argparse.Namespace, checkpoint: dict) -> str:
    """--encoder_usage_info, else the pre-training set the checkpoint's run recorded."""
    if args.encoder_usage_info:
        return args.encoder_usage_info
    recorded = recorded_pretraining_set(checkpoint)
    if recorded is not None:
        print(f"--encoder_usage_info: using '{recorded}', recorded in {args.encoder}")
        return recorded
    raise UsageError(f'--encoder_usage_info is required: {args.encoder} does not record its pre-training set '
                     f'(one of {pretraining_names()})')


def load_probe_encoder(args: argparse.Namespace) -> torch.nn.Module:
    """The encoder --encoder, loaded safely (models.load_any_encoder: a CIFAR SimCLR, or a real-world encoder of the
    family --encoder_usage_info CLIP|imagenet or --arch names, else read off the file); sets args.encoder_usage_info
    (a CIFAR SimCLR's pre-training set, `encoder_usage_info`) and, for a real-world encoder, args.arch to its family."""
    encoder, checkpoint = load_encoder(args.encoder, args, '--encoder_usage_info', args.encoder_usage_info)
    if isinstance(encoder, VisualEncoder):
        args.encoder_usage_info = FAMILIES[encoder.family].usage_info or args.encoder_usage_info
    else:
        args.encoder_usage_info = encoder_usage_info(args, checkpoint)
    return encoder


def probe_normalization(encoder: torch.nn.Module, args: argparse.Namespace) -> tuple:
    """A real-world encoder's own normalisation, else that of the pre-training set --encoder_usage_info names."""
    if isinstance(encoder, VisualEncoder):
        return encoder.normalization
    return encoder_normalization(encoder, get_info(args.encoder_usage_info).normalization)


def group_names(paths: list[str], names: list[str] | None) -> list[str]:
    """--names, or each encoder file's folder name; one per encoder, distinct, usable as a folder name."""
    names = names or [Path(path).resolve().parent.name for path in paths]
    if len(names) != len(paths):
        raise UsageError(f'--names: {len(names)} name(s) for {len(paths)} encoder(s); give one per --encoder')
    for name in names:
        if not name or name in ('.', '..') or '/' in name or '\\' in name:
            raise UsageError(f"--names: '{name}' cannot name a folder")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--names: '{repeated[0]}' names more than one encoder; give --names to tell them apart")
    return names


@dataclass
class Member:
    """One encoder of the run: its name (None for a single encoder: its lines name none), its own arguments (as its
    single run's), its features, folder and log."""
    name: str | None
    args: argparse.Namespace
    encoder: torch.nn.Module
    folder: Path | None = None
    resume_from: Path | None = None
    features: Features | None = None
    similarity: dict | None = None
    rng: torch.Tensor | None = None  # the CPU RNG state its single run has after loading its encoder
    rows: list[dict] = field(default_factory=list)  # its log.csv


def load_members(args: argparse.Namespace) -> list[Member]:
    """Every encoder loaded and its normalisation decided before anything is written; an error names the encoder.

    Loading builds the encoder (drawing its throw-away initialisation), so each is loaded from the seeded RNG
    state, as in its single run, and the state after it kept for its probe (`build_group`). One encoder without
    --names is the original's run: its arguments are the command line's (--encoder one path)."""
    single = len(args.encoder) == 1 and args.names is None
    names = [None] if single else group_names(args.encoder, args.names)
    members, seeded = [], torch.get_rng_state()
    for name, path in zip(names, args.encoder):
        torch.set_rng_state(seeded)
        member_args = argparse.Namespace(**{**vars(args), 'encoder': path})
        del member_args.names
        try:
            encoder = load_probe_encoder(member_args)
        except (CheckpointError, UsageError) as error:
            raise type(error)(f'encoder {name}: {error}' if name else str(error)) from None
        members.append(Member(name, member_args, encoder, rng=torch.get_rng_state()))
    return members


def prepare_folders(args: argparse.Namespace, members: list[Member]) -> None:
    """With --results_dir: each member's folder (DIR itself for one encoder, else DIR/<name>), each checked as a
    single run's (refusing to overwrite, or with --resume the latest probe checkpoint all members have), all checked
    before any is made."""
    if not args.results_dir:
        if args.resume:
            raise UsageError('--resume needs --results_dir, the folder holding the probe_<epoch>.pth files')
        return
    for member in members:
        member.folder = Path(args.results_dir) / (member.name or '')
        checked_checkpoints(member.folder, PROBE_PATTERN, args.resume, args.overwrite)
    if args.resume:  # the latest epoch every member saved (a group stopped while writing its checkpoints)
        common = set.intersection(*({epoch for epoch, _ in checkpoint_epochs(m.folder, PROBE_PATTERN)}
                                    for m in members))
        if not common:
            raise UsageError(f'--resume: the folders under {args.results_dir} share no probe_<epoch>.pth')
        for member in members:
            member.resume_from = member.folder / PROBE_PATTERN.format(max(common))
    for member in members:
        member.folder.mkdir(parents=True, exist_ok=True)
        write_args(member.folder, member.args)


def build_group(members: list[Member], args: argparse.Namespace, num_classes: int, device: torch.device):
    """The members' probes as one module: OneProbe for one member, else ProbeGroup. Each probe is initialised and
    its dropout generator started as its single run's: from the RNG state its single run has at this point (the
    one after loading its encoder: nothing after it draws), the init's draws, then the dropout's. A single probe
    draws its dropout from the global generator; on CUDA each probe of a group has its generator seeded with
    --seed, as a single run's CUDA generator is."""
    probes, generators = [], []
    for member in members:
        torch.set_rng_state(member.rng)
        probes.append(MLPProbe(member.features.train.shape[1], (args.hidden_size_1, args.hidden_size_2), num_classes))
        generator = torch.Generator(device)
        if device.type == 'cpu':
            generator.set_state(torch.get_rng_state())
        else:
            generator.manual_seed(args.seed)
        generators.append(generator)
    group = OneProbe(probes[0]) if len(probes) == 1 else ProbeGroup(probes, generators)
    return group.to(device)


def write_checkpoints(training: Training, members: list[Member], epoch: int) -> None:
    """probe_<epoch>.pth in each member's folder, each a single probe's: MLPProbe keys, its optimiser state, its
    arguments, its dropout generator as `generator` (on the CPU also as the `torch` RNG state) and its metrics."""
    group, state = training.model, training.optimizer.state_dict()
    for k, member in enumerate(members):
        generator = group.generators[k]
        rng = {**rng_state(), 'torch': generator.get_state()} if generator.device.type == 'cpu' else rng_state()
        save_atomic({'epoch': epoch, 'state_dict': group.probe_state(k),
                     'optimizer': group.split_optimizer_state(state, k), 'args': vars(member.args), 'rng': rng,
                     'generator': generator.get_state(), 'metrics': training.rows[-1]['metrics'][k]},
                    member.folder / PROBE_PATTERN.format(epoch))


def resume(training: Training, members: list[Member], must_match: dict) -> list[dict]:
    """Every member's probe, optimiser state, generator and log from its checkpoint; returns their metrics.
    A checkpoint without `generator` (a single probe's of an earlier version) restores the RNG states it records."""
    group, states, metrics = training.model, [], []
    for k, member in enumerate(members):
        checkpoint = load_checkpoint(member.resume_from)
        check_resumable(checkpoint, member.args, member.resume_from, must_match)
        group.load_probe_state(k, checkpoint['state_dict'])
        if 'generator' in checkpoint:
            group.generators[k].set_state(checkpoint['generator'])
        else:
            set_rng_state(checkpoint['rng'])
        states.append(checkpoint['optimizer'])
        metrics.append(dict(checkpoint.get('metrics') or {}))
        log = member.folder / 'log.csv'  # an earlier version's single probe kept its log in the checkpoint
        rows = read_csv(log) if log.is_file() else checkpoint.get('log') or []
        member.rows = [row for row in rows if int(row['epoch']) <= checkpoint['epoch']]
    # every member's checkpoint is of the same epoch (prepare_folders chose it)
    epoch = restore_optimizer(training.optimizer, {'optimizer': group.stack_optimizer_states(states),
                                                   'epoch': checkpoint['epoch']}, member.resume_from)
    training.continue_after(epoch)
    if len(members) == 1 and members[0].name is None:
        print(f'resuming from {member.resume_from} (epoch {epoch})')
    else:
        print(f'resuming {len(members)} probes from {training.results_dir}/*/{PROBE_PATTERN.format(epoch)}')
    return metrics


def probe_optimizer(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """The probe's Adam (the original's, default betas and eps), in its fastest form for the device.

    CPU: foreach, one multi-tensor update per step instead of one per parameter, the same arithmetic bit for bit
    and about 20% faster per step of the small probe. CUDA: fused, one kernel for the whole update; the same
    formula, equal within float rounding (not bit for bit); a step alone took 0.83 instead of 1.15 ms on an H100,
    where it is bound by kernel launches (docs/BENCHMARKS.md, GPU figures). A resumed probe keeps the form of
    the device it resumes on (common.runs.restore_optimizer).
    """
    fused = torch.device(device).type == 'cuda'
    return torch.optim.Adam(parameters, lr=lr, foreach=not fused, fused=fused)


def train_one_epoch(group, optimizer: torch.optim.Optimizer, features: torch.Tensor, labels: torch.Tensor,
                    batch_size: int, epoch: int) -> list[float]:
    """One pass over the stacked training features (N, T, d) in fixed order, the last partial batch kept; returns
    each probe's mean loss per feature. Each probe's loss is its own mean cross-entropy; their sum is minimised, so
    each probe gets its own gradient (one probe: F.cross_entropy of MLPProbe's logits, as the original)."""
    def step_loss(x: torch.Tensor, y: torch.Tensor):
        logits = group(x)  # (N, B, C)
        if len(group) == 1:
            loss = F.cross_entropy(logits[0], y)
            return loss, {'losses': loss.reshape(1)}
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(group)), reduction='none').view(len(group), -1)
        losses = losses.mean(dim=1)
        return losses.sum(), {'losses': losses}

    batches = [(features[:, start:start + batch_size], labels[start:start + batch_size])
               for start in range(0, features.shape[1], batch_size)]
    group.train()
    return train_steps(batches, optimizer, step_loss, epoch=epoch, device=features.device, per_image=True,
                       disable_progress=True)['losses']
