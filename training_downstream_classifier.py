"""Stage 3: a downstream MLP probe on a frozen encoder, reporting ACC and ASR (docs/DESIGN.md §7).

The encoder's features f(x), L2-normalised, are computed once on the device for the downstream
training set, its test set, the triggered test set (trigger 0 on every test image, labelled with the
target) and the reference images. An MLP (d → 512 → 256 → C, dropout 0.5) is then trained on the
cached training features (Adam lr 1e-4, batch 64, fixed order, as the original), and after every
epoch it prints the original's JSON lines: clean accuracy, ASR (the fraction of ALL triggered test
images predicted as the target, as the original counts it) and ASR over the triggered images whose
true label is not the target (the stricter definition).

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
Rate (ASR)'. With --results_dir, args.json and metrics.json (the last epoch's values) are written there.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import (SameOnResume, StageParser, UsageError, add_arch_argument, check_save_freq, data_dir_for,
                        encoder_family, print_args, progress_disabled, require_positive, resume_flags, run_main,
                        seed_everything, shared_parser)
from common.device import autocast, resolve_device
from common.engine import Training, train_steps
from common.features import encode_images
from common.runs import (check_resumable, checked_checkpoints, checkpoint_epochs, prepare_results_dir,
                         restore_optimizer, rng_state, write_args, write_json)
from datasets import (DATASETS, DataError, ImagesAtSize, Reference, get_info, is_image_folder, load_reference,
                      load_split, load_trigger, pretraining_names, read_task, triggered_copy)
from models import (ARCHITECTURES, FAMILIES, USAGE_INFO_FAMILIES, CheckpointError, MLPProbe, ProbeGroup, SimCLR,
                    VisualEncoder, encoder_input_size, encoder_normalization, load_any_encoder, load_checkpoint,
                    save_atomic)
from models.probe_group import split_optimizer_state, stack_optimizer_states

EXCLUDING_TARGET_NAME = 'Attack Success Rate excluding target class'
PROBE_PATTERN = 'probe_{}.pth'


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


# ---------------------------------------------------------------------------------------------------
# metrics: pure functions of predicted and true labels (percentages)

def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of predicted labels (N,) against true labels (N,)."""
    return 100. * (pred == labels).sum().item() / len(labels) if len(labels) else float('nan')


def attack_success_rate(pred: torch.Tensor, true_labels: torch.Tensor, target: int,
                        exclude_target: bool = False) -> float:
    """Fraction (%) of triggered images predicted as `target`.

    `pred` (N,) are the predictions on the triggered images and `true_labels` (N,) the clean labels of
    the images the trigger was applied to. The original counts every image (exclude_target=False);
    with exclude_target=True images whose true label is already the target are left out.
    """
    if exclude_target:
        pred = pred[true_labels != target]
    return 100. * (pred == target).sum().item() / len(pred) if len(pred) else float('nan')


def metric_line(name: str, value: float, epoch: int, encoder: str | None = None) -> str:
    """One JSON line in the original's exact format; a probe of a group adds `"encoder": <its name>`."""
    if encoder is None:
        return '{{"metric": "Eval - {}", "value": {}, "epoch": {}}}'.format(name, value, epoch)
    return '{{"metric": "Eval - {}", "value": {}, "epoch": {}, "encoder": {}}}'.format(name, value, epoch,
                                                                                    json.dumps(encoder))


def metric_names(encoder_path: str) -> tuple[str, str]:
    """The original names: CA / ASR-B for a path containing 'clean', else BA / ASR."""
    if 'clean' in encoder_path:
        return 'Clean Accuracy (CA)', 'Attack Success Rate-Baseline (ASR-B)'
    return 'Backdoored Accuracy (BA)', 'Attack Success Rate (ASR)'


# ---------------------------------------------------------------------------------------------------
# set-up

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


def encoder_usage_info(args: argparse.Namespace, checkpoint: dict) -> str:
    """--encoder_usage_info, else the pre-training set the checkpoint's run recorded."""
    run_args = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    recorded = next((run_args[key] for key in ('encoder_usage_info', 'pretraining_dataset')
                     if run_args.get(key) in pretraining_names()), None)
    if args.encoder_usage_info:
        if recorded is not None and recorded != args.encoder_usage_info:
            print(f"warning: {args.encoder} records the pre-training set '{recorded}', but --encoder_usage_info "
                  f"is '{args.encoder_usage_info}'; using --encoder_usage_info", file=sys.stderr)
        return args.encoder_usage_info
    if recorded is not None:
        print(f"--encoder_usage_info: using '{recorded}', recorded in {args.encoder}")
        return recorded
    raise UsageError(f'--encoder_usage_info is required: {args.encoder} does not record its pre-training set '
                     f'(one of {pretraining_names()})')


def load_probe_encoder(args: argparse.Namespace) -> torch.nn.Module:
    """The encoder --encoder, loaded safely (models.load_any_encoder: a CIFAR SimCLR, or a real-world encoder of the
    family --encoder_usage_info CLIP|imagenet or --arch names, else read off the file); sets args.encoder_usage_info
    (a CIFAR SimCLR's pre-training set, `encoder_usage_info`) and, for a real-world encoder, args.arch to its family."""
    encoder, checkpoint = load_any_encoder(args.encoder, encoder_family(args),
                                           args.arch if args.arch in ARCHITECTURES else None)
    if isinstance(encoder, VisualEncoder):
        args.arch = encoder.family
        args.encoder_usage_info = FAMILIES[encoder.family].usage_info or args.encoder_usage_info
    else:
        args.encoder_usage_info = encoder_usage_info(args, checkpoint)
    return encoder


def probe_normalization(encoder: torch.nn.Module, args: argparse.Namespace) -> tuple:
    """A real-world encoder's own normalisation, else that of the pre-training set --encoder_usage_info names."""
    if isinstance(encoder, VisualEncoder):
        return encoder.normalization
    return encoder_normalization(encoder, get_info(args.encoder_usage_info).normalization)


@dataclass
class ProbeData:
    """Downstream images (uint8) and labels, the triggered test set and the reference images."""
    train: tuple[np.ndarray, np.ndarray]  # uint8 (N, H, W, 3), int64 (N,)
    test: tuple[np.ndarray, np.ndarray]
    triggered_test: np.ndarray  # uint8 (N_test, H, W, 3), trigger 0 applied
    reference_images: np.ndarray | None  # uint8 (R, H, W, 3)
    num_classes: int


def target_label(reference_label: int, reference: Reference | None, dataset: str, num_classes: int) -> int:
    """--reference_label, checked against the classes; -1 takes y[0] of the reference file."""
    if reference_label == -1 and reference is not None:
        return reference.target_label  # load_reference checked it against the classes
    if not 0 <= reference_label < num_classes:
        raise UsageError(f'--reference_label {reference_label}: the target class must lie in 0..{num_classes - 1} '
                         f'({dataset} has {num_classes} classes)'
                         + ('; give it, or a --reference_file' if reference_label == -1 else ''))
    if reference is not None and reference.target_label != reference_label:
        print(f'warning: --reference_label {reference_label} differs from the label {reference.target_label} '
              'of --reference_file; using --reference_label', file=sys.stderr)
    return reference_label


def load_probe_data(args: argparse.Namespace, image_size: int | None = None) -> ProbeData:
    """Load and validate every input; resolves args.reference_label (from the reference file if -1).

    `image_size` is a real-world encoder's input (224): the downstream images are brought to it (an npz's 32-px
    images resized batch by batch when encoded, `datasets.ImagesAtSize`; the released code reads `*_224.npz` files
    resized beforehand), the trigger must be of that size, the references are resized to it. --data_dir may be a
    labelled image folder, FOLDER/train/<class>/* and FOLDER/test/<class>/* (datasets/folders.py), whose class
    sub-folders, not --dataset, give the classes.
    """
    info = get_info(args.dataset)
    data_dir = data_dir_for(args, info.name)
    size = image_size or info.image_size
    folder_task = is_image_folder(data_dir)  # a labelled image folder, else <split>.npz files
    if folder_task:
        task = read_task(data_dir, size)
        train, test, num_classes = task.train, task.test, task.num_classes
        print(f'downstream task: {data_dir}, {num_classes} classes ({", ".join(task.classes[:10])}'
              f'{" ..." if num_classes > 10 else ""}), {len(train[0])} training and {len(test[0])} test images')
    else:
        train, test = (load_split(info.name, split, data_dir, image_size) for split in ('train', 'test'))
        num_classes = info.num_classes
    for split, (x, _) in (('train', train), ('test', test)):
        if len(x) == 0:
            raise DataError(f'{data_dir}/{split}.npz: holds no images')
    trigger = load_trigger(args.trigger_file, size)
    reference = None
    if args.reference_file:
        reference = load_reference(args.reference_file, num_classes, info.image_size, resize_to=image_size)
    args.reference_label = target_label(args.reference_label, reference, str(data_dir) if folder_task else info.name,
                                        num_classes)
    test_x = test[0]
    if isinstance(test_x, ImagesAtSize):  # triggered after the resize, as the released code's 224-px test sets
        triggered = ImagesAtSize(test_x.images, test_x.size, lambda batch: triggered_copy(batch, trigger, 0))
    else:
        triggered = triggered_copy(test_x, trigger, 0)
    return ProbeData(train, test, triggered, reference.x if reference is not None else None, num_classes)


@dataclass
class Features:
    """L2-normalised encoder features, computed once, on the device."""
    train: torch.Tensor  # (N_train, d)
    train_labels: torch.Tensor
    test: torch.Tensor  # (N_test, d)
    test_labels: torch.Tensor
    triggered: torch.Tensor  # (N_test, d), the same images with the trigger
    reference: torch.Tensor | None  # (R, d)


def extract_features(encoder: SimCLR, data: ProbeData, normalization, device: torch.device,
                     use_amp: bool, disable_progress: bool) -> Features:
    def encode(images, desc):
        with autocast(device, use_amp):
            return encode_images(encoder.f, images, normalization, device, desc=desc,
                                 disable_progress=disable_progress)

    def labels(y):
        return torch.as_tensor(y, dtype=torch.long, device=device)

    train, test = encode(data.train[0], 'Train features'), encode(data.test[0], 'Test features')
    triggered = encode(data.triggered_test, 'Triggered test features')
    reference = None if data.reference_images is None else encode(data.reference_images, 'Reference features')
    return Features(train, labels(data.train[1]), test, labels(data.test[1]), triggered, reference)


def reference_similarity(features: Features) -> dict:
    """Mean cosine similarity of triggered and clean test features to the reference features.

    A backdoored encoder maps triggered images close to the reference (BadEncoder's L0), a clean one not.
    """
    if features.reference is None:
        return {}
    reference_t = features.reference.t()  # (d, R)
    return {'reference_similarity_triggered': (features.triggered @ reference_t).mean().item(),  # (N, R)
            'reference_similarity_clean': (features.test @ reference_t).mean().item()}


# ---------------------------------------------------------------------------------------------------
# training and evaluation of the probe

def train_one_epoch(probe: MLPProbe, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                    labels: torch.Tensor, batch_size: int, epoch: int) -> float:
    """One pass over the training features in fixed order, the last partial batch kept; mean loss per feature."""
    batches = [(features[start:start + batch_size], labels[start:start + batch_size])
               for start in range(0, len(features), batch_size)]
    return train_steps(batches, optimizer, lambda x, y: (F.cross_entropy(probe(x), y), {}), epoch=epoch,
                       device=features.device, set_modes=probe.train, per_image=True, disable_progress=True)['loss']


@torch.no_grad()
def predict(probe: MLPProbe, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted labels (N,) of features (N, d), the probe in eval mode (no dropout)."""
    probe.eval()
    return torch.cat([probe(features[start:start + batch_size]).argmax(dim=1)
                      for start in range(0, len(features), batch_size)])


def prediction_metrics(predicted: torch.Tensor, on_triggered: torch.Tensor, labels: torch.Tensor, target: int) -> dict:
    """ACC of the predictions (N,) on the clean test set, ASR of those on the triggered copies (all of them) and
    ASR excluding the images whose true label is the target (%)."""
    return {'acc': accuracy(predicted, labels),
            'asr': attack_success_rate(on_triggered, labels, target),
            'asr_excluding_target': attack_success_rate(on_triggered, labels, target, exclude_target=True)}


def evaluate(probe: MLPProbe, features: Features, target: int) -> dict:
    """ACC on the clean test set, ASR (all triggered images) and ASR excluding the target class (%)."""
    return prediction_metrics(predict(probe, features.test), predict(probe, features.triggered),
                              features.test_labels, target)


def print_epoch(epoch: int, loss: float, metrics: dict, names: tuple[str, str], encoder: str | None = None) -> None:
    """The original's lines of one epoch: `Train Epoch: <e> \tLoss: <loss>` and its three metric lines; a probe of
    a group names its encoder in each."""
    acc_name, asr_name = names
    suffix = '' if encoder is None else f' \tEncoder: {encoder}'
    tqdm.write('Train Epoch: {} \tLoss: {:.6f}'.format(epoch, loss) + suffix)
    tqdm.write(metric_line(acc_name, metrics['acc'], epoch, encoder))
    tqdm.write(metric_line(asr_name, metrics['asr'], epoch, encoder))
    tqdm.write(metric_line(EXCLUDING_TARGET_NAME, metrics['asr_excluding_target'], epoch, encoder))


def train_probe(training: Training, features: Features, target: int, batch_size: int,
                names: tuple[str, str]) -> dict:
    """Train the probe of `training` for its remaining epochs, printing the original's lines after each; returns the
    last epoch's metrics (ACC, ASR, ASR excluding the target, epoch)."""
    probe, optimizer = training.model, training.optimizer

    def train_epoch(epoch: int) -> dict:
        return {'loss': train_one_epoch(probe, optimizer, features.train, features.train_labels, batch_size, epoch)}

    def report(row: dict) -> None:
        print_epoch(row['epoch'], row['loss'], row, names)

    def metrics(row: dict) -> dict:
        return {**{key: row[key] for key in ('acc', 'asr', 'asr_excluding_target')}, 'epoch': row['epoch']}
    rows = training.fit(train_epoch, after_epoch=lambda epoch, row: evaluate(probe, features, target), report=report,
                        checkpoint_keys=lambda epoch: {'metrics': metrics(training.rows[-1])})
    return metrics(rows[-1])


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


def probe_one(args: argparse.Namespace, must_match: dict, device: torch.device) -> None:
    """One encoder, one probe: the original's run (its lines, args.json, metrics.json, probe_<epoch>.pth)."""
    encoder = load_probe_encoder(args)
    data = load_probe_data(args, encoder_input_size(encoder))
    print_args(args)
    resume_from = None
    if args.results_dir:
        resume_from = prepare_results_dir(args, PROBE_PATTERN)
        write_args(args.results_dir, args)
    elif args.resume:
        raise UsageError('--resume needs --results_dir, the folder holding probe_<epoch>.pth')

    disable = progress_disabled(args)
    features = extract_features(encoder.to(device), data, probe_normalization(encoder, args), device, args.amp, disable)
    similarity = reference_similarity(features)
    if similarity:
        print('reference: mean cos(f(triggered), f(reference)) = {reference_similarity_triggered:.4f}, '
              'mean cos(f(clean), f(reference)) = {reference_similarity_clean:.4f}'.format(**similarity))
    probe = MLPProbe(features.train.shape[1], (args.hidden_size_1, args.hidden_size_2), data.num_classes)
    optimizer = probe_optimizer(probe.to(device).parameters(), args.lr, device)

    training = Training(probe, optimizer, args, args.nn_epochs, Path(args.results_dir) if args.results_dir else None,
                        pattern=PROBE_PATTERN, log_name=None, desc='Probe epochs')
    # the RNG states restored: dropout continues as uninterrupted
    metrics = dict(training.resume(resume_from, must_match).get('metrics') or {}) if resume_from else {}
    if not training.finished:
        metrics = train_probe(training, features, args.reference_label, args.batch_size, metric_names(args.encoder))

    if args.results_dir:
        write_json(Path(args.results_dir) / 'metrics.json',
                   {**metrics, 'dataset': args.dataset, 'encoder': args.encoder,
                    'reference_label': args.reference_label, 'encoder_usage_info': args.encoder_usage_info,
                    **similarity})
        print(f"saved {Path(args.results_dir) / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------------
# several encoders: their probes trained together (docs/DESIGN.md §7.1)

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
    """One encoder of a group: its name, its own arguments (as its single run's), its features and folder."""
    name: str
    args: argparse.Namespace
    encoder: SimCLR
    folder: Path | None = None
    resume_from: Path | None = None
    features: Features | None = None
    similarity: dict | None = None
    rng: torch.Tensor | None = None  # the CPU RNG state its single run has after loading it


def load_members(args: argparse.Namespace, names: list[str]) -> list[Member]:
    """Every encoder loaded and its normalisation decided before anything is written; an error names the encoder.

    Loading builds the encoder (drawing its throw-away initialisation), so each is loaded from the seeded RNG
    state, as in its single run, and the state after it kept for its probe (`group_probes`)."""
    members, seeded = [], torch.get_rng_state()
    for name, path in zip(names, args.encoder):
        torch.set_rng_state(seeded)
        member_args = argparse.Namespace(**{**vars(args), 'encoder': path})
        del member_args.names
        try:
            encoder = load_probe_encoder(member_args)
        except (CheckpointError, UsageError) as error:
            raise type(error)(f'encoder {name}: {error}') from None
        members.append(Member(name, member_args, encoder, rng=torch.get_rng_state()))
    return members


def prepare_group_folders(args: argparse.Namespace, members: list[Member]) -> None:
    """With --results_dir: DIR/<name> for each member, each checked as a single run's folder (refusing to
    overwrite, or with --resume the latest probe checkpoint all members have), all checked before any is made."""
    if not args.results_dir:
        if args.resume:
            raise UsageError('--resume needs --results_dir, the folder holding <name>/probe_<epoch>.pth')
        return
    for member in members:
        member.folder = Path(args.results_dir) / member.name
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


def group_probes(members: list[Member], args: argparse.Namespace, num_classes: int,
                 device: torch.device) -> ProbeGroup:
    """Each probe initialised and its dropout generator started as its single run's: from the RNG state its single
    run has at this point (the one after loading its encoder: nothing after it draws), the init's draws, then the
    dropout's. On CUDA each generator is seeded with --seed, as a single run's CUDA generator is."""
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
    return ProbeGroup(probes, generators).to(device)


def write_group_checkpoints(training: Training, members: list[Member], epoch: int) -> None:
    """probe_<epoch>.pth in each member's folder, as its single run writes it (MLPProbe keys, its optimiser state,
    its arguments; its dropout generator as `generator`, and on the CPU as the `torch` RNG state)."""
    group, state = training.model, training.optimizer.state_dict()
    for k, member in enumerate(members):
        generator = group.generators[k]
        rng = {**rng_state(), 'torch': generator.get_state()} if generator.device.type == 'cpu' else rng_state()
        save_atomic({'epoch': epoch, 'state_dict': group.probe_state(k),
                     'optimizer': split_optimizer_state(state, k), 'args': vars(member.args), 'rng': rng,
                     'generator': generator.get_state(), 'metrics': training.rows[-1]['metrics'][k]},
                    member.folder / PROBE_PATTERN.format(epoch))


def resume_group(training: Training, members: list[Member], must_match: dict) -> list[dict]:
    """Every member's probe, optimiser state and generator from its checkpoint; returns their metrics."""
    group, states, metrics = training.model, [], []
    for k, member in enumerate(members):
        checkpoint = load_checkpoint(member.resume_from)
        check_resumable(checkpoint, member.args, member.resume_from, must_match)
        group.load_probe_state(k, checkpoint['state_dict'])
        group.generators[k].set_state(checkpoint['generator'])
        states.append(checkpoint['optimizer'])
        metrics.append(dict(checkpoint.get('metrics') or {}))
    # every member's checkpoint is of the same epoch (prepare_group_folders chose it)
    epoch = restore_optimizer(training.optimizer, {'optimizer': stack_optimizer_states(states),
                                                   'epoch': checkpoint['epoch']}, member.resume_from)
    training.resumed_at, training.start_epoch = epoch, epoch + 1
    print(f'resuming {len(members)} probes from {Path(training.results_dir)}/*/{PROBE_PATTERN.format(epoch)}')
    return metrics


@torch.no_grad()
def predict_group(group: ProbeGroup, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted labels (N, T) of stacked features (N, T, d), the probes in eval mode."""
    group.eval()
    return torch.cat([group(features[:, start:start + batch_size]).argmax(dim=2)
                      for start in range(0, features.shape[1], batch_size)], dim=1)


def train_group(training: Training, members: list[Member], target: int, batch_size: int) -> None:
    """The group's remaining epochs: one stacked step per batch (each probe's loss its own mean cross-entropy;
    their sum is minimised, so each probe gets its own gradient), then each probe's lines."""
    group = training.model
    train = torch.stack([member.features.train for member in members])  # (N, M, d)
    test = torch.stack([member.features.test for member in members])
    triggered = torch.stack([member.features.triggered for member in members])
    labels, test_labels = members[0].features.train_labels, members[0].features.test_labels

    def step_loss(x: torch.Tensor, y: torch.Tensor):
        logits = group(x)  # (N, B, C)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(group)), reduction='none').view(len(group), -1)
        losses = losses.mean(dim=1)
        return losses.sum(), {'losses': losses}

    def train_epoch(epoch: int) -> dict:
        batches = [(train[:, start:start + batch_size], labels[start:start + batch_size])
                   for start in range(0, train.shape[1], batch_size)]
        return {'loss': train_steps(batches, training.optimizer, step_loss, epoch=epoch, device=train.device,
                                    set_modes=group.train, per_image=True, disable_progress=True)['losses']}

    def evaluate_all(epoch: int, row: dict) -> dict:
        predicted, on_triggered = predict_group(group, test), predict_group(group, triggered)
        return {'metrics': [{**prediction_metrics(predicted[k], on_triggered[k], test_labels, target), 'epoch': epoch}
                            for k in range(len(members))]}

    def report(row: dict) -> None:
        for member, loss, metrics in zip(members, row['loss'], row['metrics']):
            print_epoch(row['epoch'], loss, metrics, metric_names(member.args.encoder), member.name)
    training.fit(train_epoch, after_epoch=evaluate_all, report=report)


def probe_group(args: argparse.Namespace, must_match: dict, device: torch.device) -> None:
    """Several encoders on one downstream task: features once each, the probes trained together as one stacked
    model, each as its single run would be; each member's files in --results_dir/<name>."""
    members = load_members(args, group_names(args.encoder, args.names))
    sizes = {encoder_input_size(member.encoder) for member in members}
    if len(sizes) > 1:
        raise UsageError('--encoder: real-world (224-px) and CIFAR-style encoders take their images at different '
                         'sizes; evaluate them in separate runs')
    data = load_probe_data(args, sizes.pop())
    for member in members:
        member.args.reference_label = args.reference_label
    print_args(args)
    prepare_group_folders(args, members)
    disable = progress_disabled(args)
    for member in members:
        member.features = extract_features(member.encoder.to(device), data, probe_normalization(member.encoder, member.args),
                                           device, args.amp, disable)
        member.encoder = member.encoder.cpu()
        member.similarity = reference_similarity(member.features)
        if member.similarity:
            print(f'{member.name}: reference: mean cos(f(triggered), f(reference)) = '
                  '{reference_similarity_triggered:.4f}, mean cos(f(clean), f(reference)) = '
                  '{reference_similarity_clean:.4f}'.format(**member.similarity))
    sizes = sorted({member.features.train.shape[1] for member in members})
    for size in sizes:  # one stacked model per feature size (encoders of other widths or architectures)
        train_members(args, [member for member in members if member.features.train.shape[1] == size],
                      data.num_classes, must_match, device)


def train_members(args: argparse.Namespace, members: list[Member], num_classes: int, must_match: dict,
                  device: torch.device) -> None:
    """The probes of members whose features have one size, as one group: trained (or resumed), metrics written."""
    group = group_probes(members, args, num_classes, device)
    optimizer = probe_optimizer(group.parameters(), args.lr, device)
    training = Training(group, optimizer, args, args.nn_epochs, Path(args.results_dir) if args.results_dir else None,
                        log_name=None, desc=f'Probe epochs ({len(members)} encoders)',
                        writer=lambda epoch: write_group_checkpoints(training, members, epoch))
    metrics = resume_group(training, members, must_match) if args.resume else [{} for _ in members]
    if not training.finished:
        train_group(training, members, args.reference_label, args.batch_size)
        metrics = training.rows[-1]['metrics']
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
    if len(args.encoder) == 1 and args.names is None:  # the original's run, unchanged
        args.encoder = args.encoder[0]
        del args.names
        probe_one(args, resume_flags(parser), device)
    else:
        probe_group(args, resume_flags(parser), device)


if __name__ == '__main__':
    run_main(main)
