#!/usr/bin/env python
"""Time the original MIMIC implementation on this machine, the way scripts/benchmark.py times ours.

scripts/investigate/compare_original.py runs this in a child process with the synthetic data files it wrote; it
is not meant to be run by hand. The original's own functions are called unchanged:

    simclr_img_per_s       train_clean_encoder.train          (stage 0 training loop)
    badencoder_img_per_s   train_badencoder.train             (stage 1, 1 reference)
    mimic_img_per_s        MIMIC.train                        (stage 2 distillation)
    mi_estimation_s        models.scheduler.weight_scheduler.estimate_mi over the clean images
    downstream_s           evaluation's net_train + 2 x net_test per epoch, on create_torch_dataloader loaders

with the original's datasets and transforms (datasets.cifar10_dataset, datasets.backdoor_dataset) in
DataLoaders of --num_workers workers, the same for both implementations. On CUDA the original's own settings
apply (cuDNN deterministic, no autotuning; its 'file_system' tensor sharing during stage 1, which its
train_badencoder.py sets). The adaptations, none of which changes the work done: on a CPU `.cuda()` moves
nothing (the original calls it everywhere); the modules the original imports but whose source its public
repository lacks (CLIP, ImageNet, GTSRB and SVHN data), or which are not installed (setproctitle, pandas),
and which the timed code never calls, are stand-ins that raise if called; the original's globals read by its
progress bars (`optimizer`, `epoch`) are set. The probe needs evaluation/nn_classifier.py, which the public
repository holds only as .pyc: put BadEncoder's (github.com/jinyuan-jia/BadEncoder,
evaluation/nn_classifier.py, from which the original's comes) in the checkout, or the probe figure is left
out.

The MI estimation and the probe are timed for a few epochs and scaled linearly, as benchmark.py does (the
MI estimation's one-off set-up is timed apart and not scaled). For the original's MI estimation this is a
lower bound: it registers new forward hooks on every batch and never removes them, so its later epochs are
slower than its first.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models  # noqa: F401  (imported before the stand-ins exist: it looks for pandas and others)
from torch.utils.data import DataLoader, Subset

# scripts/, for bench_tools; not the repository, whose packages share the names of the original's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_tools import (TimedLoader, counting_forwards, extrapolated_figures, probe_figures,  # noqa: E402
                         synchronize)

LAYERS = [3, 4, 5, 6]  # the tapped layers f.f.3..6, as the original's MIMIC.py passes them
MI_ATTEMPTS = 3  # the original's MI estimator can stop on a NaN loss (exp overflow in its DV bound)
# Modules the original imports whose source is not in its public repository (or which are not installed
# here); the timed code never calls into them.
STAND_INS = {'models.clip_model': ['CLIP'], 'models.imagenet_model': ['ImageNetResNet'],
             'datasets.gtsrb_dataset': ['get_downstream_gtsrb', 'classes'],
             'datasets.svhn_dataset': ['get_downstream_svhn', 'classes'],
             'evaluation.nn_classifier': ['NeuralNet', 'create_torch_dataloader', 'net_train', 'net_test',
                                          'predict_feature'],
             'pandas': [], 'setproctitle': []}


# the counts compare_original.py resolves as benchmark.py does and passes on, with their help texts
COUNT_HELP = {
    'num_workers': 'DataLoader worker processes', 'threads': 'torch CPU threads, 0 = torch\'s choice',
    'seed': 'random seed', 'warmup': 'untimed steps before each measurement', 'steps': 'timed steps per stage',
    'batch_size': 'stage 0 batch', 'badencoder_batch_size': 'stage 1 batch', 'mimic_batch_size': 'stage 2 batch',
    'mi_batch_size': 'batch of the MI estimation', 'mi_images': 'clean images of the MI estimation',
    'mi_epochs': 'MI epochs the figure is for', 'mi_measure_epochs': 'MI epochs run',
    'probe_features': 'training features of the probe', 'probe_test_features': 'test features of the probe',
    'probe_classes': 'classes of the probe', 'probe_batch_size': 'probe batch',
    'probe_epochs': 'probe epochs the figure is for', 'probe_measure_epochs': 'probe epochs run'}


def get_args_parser() -> argparse.ArgumentParser:
    """The counts of scripts/benchmark.py, as compare_original.py resolved them; all required."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--original', required=True, help='checkout of the original implementation')
    parser.add_argument('--data_dir', required=True, help='folder with train.npz and test.npz (original layout)')
    parser.add_argument('--trigger_file', required=True, help='trigger file (t, tm) in the original layout')
    parser.add_argument('--reference_file', required=True, help='reference file (x, y) in the original layout')
    parser.add_argument('--device', required=True, help='cpu, cuda or cuda:N')
    for name, text in COUNT_HELP.items():
        parser.add_argument(f'--{name}', required=True, type=int, help=text)
    return parser


def missing_source(original: Path, name: str) -> bool:
    if '.' in name:
        return not (original / (name.replace('.', '/') + '.py')).is_file()
    return importlib.util.find_spec(name) is None


def install_stand_ins(original: Path) -> list[str]:
    """Stand-in modules for those the original imports but cannot be found; returns their names."""
    def unavailable(*_args, **_kwargs):
        raise RuntimeError('not part of the comparison: the original\'s source for this is not available')

    installed = []
    for name, attributes in STAND_INS.items():
        if missing_source(original, name):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
            for attribute in attributes:
                setattr(module, attribute, unavailable)
            if name == 'setproctitle':
                module.setproctitle = lambda title: None  # called when MIMIC.py is imported
            sys.modules[name] = module
            installed.append(name)
    return installed


def run_cuda_calls_on_the_cpu() -> None:
    """The original moves everything with .cuda(...); on a CPU run those calls leave data where it is."""
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **_: self
    torch.nn.Module.cuda = lambda self, device=None: self


def import_original(original: Path, stand_ins: list[str]) -> types.SimpleNamespace:
    """The original's modules. Importing its train_badencoder switches the whole process to the 'file_system'
    tensor sharing strategy; that is undone here and redone around stage 1 only, as the original's own scripts
    run (bench_badencoder)."""
    sys.path.insert(0, str(original))
    strategy = torch.multiprocessing.get_sharing_strategy()
    with contextlib.redirect_stdout(sys.stderr):
        import MIMIC
        import models
        import train_badencoder
        import train_clean_encoder
        from datasets import backdoor_dataset, cifar10_dataset
        from evaluation import nn_classifier
    badencoder_strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(strategy)
    if Path(models.__file__).resolve().parent != (original / 'models').resolve():
        raise SystemExit(f'error: imported models from {models.__file__}, not from {original}')
    return types.SimpleNamespace(mimic=MIMIC, models=models, clean=train_clean_encoder, bad=train_badencoder,
                                 cifar10=cifar10_dataset, backdoor=backdoor_dataset, nn=nn_classifier,
                                 stand_ins=stand_ins, badencoder_strategy=badencoder_strategy)


def loader(dataset, batch_size: int, args, device: torch.device, shuffle: bool = True,
           drop_last: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=args.num_workers,
                      pin_memory=device.type == 'cuda', drop_last=drop_last)


def first(dataset, count: int) -> Subset:
    return Subset(dataset, range(count))


def trunk(model) -> torch.nn.Module:
    """The first convolution of the encoder: it runs once for every pass through the encoder, whichever way
    the original calls it (the whole model, model.f, or module by module as MIMIC.train does)."""
    return model.f.f[0]


def bench_simclr(original, args, device) -> dict:
    steps = args.warmup + args.steps
    train_data, _, _ = original.cifar10.get_pretraining_cifar10(args.data_dir, None)
    model = original.models.SimCLR().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    original.clean.optimizer = optimizer  # the original's progress bar reads this global
    timed = TimedLoader(loader(first(train_data, args.batch_size * steps), args.batch_size, args, device),
                        args.warmup, device)
    run_args = argparse.Namespace(knn_t=0.5, batch_size=args.batch_size, epochs=1)
    with counting_forwards(trunk(model)) as passes:
        original.clean.train(model, timed, optimizer, 1, run_args)
    return {'simclr_img_per_s': args.batch_size * timed.timed_steps / timed.seconds,
            'simclr_forwards_per_step': passes['calls'] / len(timed)}


def bench_badencoder(original, args, device) -> dict:
    batch, steps = args.badencoder_batch_size, args.warmup + args.steps
    cifar10 = original.cifar10
    shadow = original.backdoor.BadEncoderDataset(
        numpy_file=args.data_dir + 'train.npz', trigger_file=args.trigger_file,
        reference_file=args.reference_file, class_type=cifar10.classes, indices=np.arange(batch * steps),
        transform=cifar10.train_transform, bd_transform=cifar10.test_transform_cifar10,
        ftt_transform=cifar10.finetune_transform_cifar10)  # as get_shadow_cifar10 builds it
    clean_model, model = original.models.SimCLR().to(device), original.models.SimCLR().to(device)
    model.load_state_dict(clean_model.state_dict())
    optimizer = torch.optim.SGD(model.f.parameters(), lr=1e-3, weight_decay=5e-4, momentum=0.9)
    original.bad.epoch = 1  # the original's progress bar reads this global
    timed = TimedLoader(loader(shadow, batch, args, device), args.warmup, device)
    run_args = argparse.Namespace(lambda1=1.0, lambda2=1.0, epochs=1)
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(original.badencoder_strategy)
    try:
        with counting_forwards(trunk(model)) as passes, counting_forwards(trunk(clean_model)) as clean_passes:
            original.bad.train(model.f, clean_model.f, timed, optimizer, run_args)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    return {'badencoder_img_per_s': batch * timed.timed_steps / timed.seconds,
            'badencoder_encoder_forwards_per_step': passes['calls'] / len(timed),
            'badencoder_clean_encoder_forwards_per_step': clean_passes['calls'] / len(timed)}


def bench_mimic(original, args, device) -> dict:
    batch, steps = args.mimic_batch_size, args.warmup + args.steps
    train_data, _, _ = original.cifar10.get_pretraining_cifar10(args.data_dir, None)
    teacher, student = original.models.SimCLR().to(device), original.models.SimCLR().to(device)
    teacher.eval()  # as MIMIC.py: eval mode, parameters left trainable
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-6)
    original.mimic.optimizer = optimizer  # the original's progress bar reads this global
    equal = 1000 + 10000 * 0.25  # the weights update_weight gives for equal MI: the cost does not depend on them
    run_args = argparse.Namespace(device=device, knn_t=0.5, batch_size=batch, epochs=1, opt1=equal, opt2=equal,
                                  opt3=equal, opt4=equal, opt5=1)
    timed = TimedLoader(loader(first(train_data, batch * steps), batch, args, device), args.warmup, device)
    with counting_forwards(trunk(student)) as student_passes, counting_forwards(trunk(teacher)) as teacher_passes:
        original.mimic.train(student, teacher, timed, optimizer, 1, run_args)
    return {'mimic_img_per_s': batch * timed.timed_steps / timed.seconds,
            'mimic_student_forwards_per_step': student_passes['calls'] / len(timed),
            'mimic_teacher_forwards_per_step': teacher_passes['calls'] / len(timed),
            'mimic_teacher_gets_gradients': any(p.grad is not None for p in teacher.parameters())}


def bench_mi(original, args, device) -> dict:
    _, memory_data, _ = original.cifar10.get_pretraining_cifar10(args.data_dir, None)
    clean = loader(first(memory_data, args.mi_images), args.mi_batch_size, args, device, shuffle=False,
                   drop_last=False)  # MIMIC.py's memory loader

    def estimate(epochs: int) -> tuple[float, dict]:
        """Seconds and network passes of one estimate_mi, on a fresh student (the original estimates MI on its
        fresh student; fresh, so that no hooks left by an earlier call slow this one down)."""
        student = original.models.SimCLR().to(device)
        scheduler = original.models.weight_scheduler(base_opt=[1000] * 4, momentum_opt=10000, EPOCHS=epochs)
        with counting_forwards(trunk(student)) as passes, contextlib.redirect_stdout(sys.stderr):
            synchronize(device)
            start = time.perf_counter()
            scheduler.estimate_mi(student, clean, LAYERS, device)
            synchronize(device)
        return time.perf_counter() - start, passes

    # The set-up (a 100-image pass per layer for the sizes, the statistics networks) happens once per run:
    # timed on its own with 0 epochs, it is not scaled with the epochs, as benchmark.py does not scale ours.
    setup_seconds, _ = estimate(0)
    for attempt in range(MI_ATTEMPTS):
        torch.manual_seed(args.seed + attempt)
        try:
            seconds, passes = estimate(args.mi_measure_epochs)
            break
        except AssertionError:  # the original's `assert not loss.isnan()`: its DV bound overflowed
            if attempt + 1 == MI_ATTEMPTS:
                raise
            print(f'the original\'s MI estimator stopped on a NaN loss (its own assertion); timing it again with '
                  f'seed {args.seed + attempt + 1}', file=sys.stderr)
    shape_probe_images = 100 * len(LAYERS)
    passes_per_image = (passes['images'] - shape_probe_images) / args.mi_images
    scale = args.mi_epochs / args.mi_measure_epochs
    return {'mi_estimation_s': setup_seconds + (seconds - setup_seconds) * scale, 'mi_setup_s': setup_seconds,
            'mi_measured_s': seconds, 'mi_network_passes_per_image': passes_per_image * scale,
            'mi_nan_failures': attempt}


def bench_probe(original, args, device) -> dict | None:
    if 'evaluation.nn_classifier' in original.stand_ins:
        return None
    nn_classifier = original.nn
    generator = torch.Generator().manual_seed(args.seed)

    def features(count: int) -> np.ndarray:
        return F.normalize(torch.randn(count, 512, generator=generator), dim=1).numpy()

    def labels(count: int) -> np.ndarray:
        return torch.randint(args.probe_classes, (count,), generator=generator).numpy()

    # as the original's training_downstream_classifier.py: three loaders over the feature banks (with the
    # loader defaults of create_torch_dataloader), net_train then net_test on clean and triggered features
    train = nn_classifier.create_torch_dataloader(features(args.probe_features), labels(args.probe_features),
                                                  args.probe_batch_size)
    test = nn_classifier.create_torch_dataloader(features(args.probe_test_features),
                                                 labels(args.probe_test_features), args.probe_batch_size)
    triggered = nn_classifier.create_torch_dataloader(features(args.probe_test_features),
                                                      labels(args.probe_test_features), args.probe_batch_size)
    net = nn_classifier.NeuralNet(512, [512, 256], args.probe_classes).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()

    def train_epochs(epochs: int) -> None:
        for epoch in range(1, epochs + 1):
            nn_classifier.net_train(net, train, optimizer, epoch, criterion)
            nn_classifier.net_test(net, test, epoch, criterion, 'Backdoored Accuracy (BA)')
            nn_classifier.net_test(net, triggered, epoch, criterion, 'Attack Success Rate (ASR)')

    return probe_figures(train_epochs, args, device)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    original = Path(args.original).resolve()
    args.data_dir = str(Path(args.data_dir).resolve()) + '/'  # the original joins paths by concatenation
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')  # the original's loaders ask for pinned memory on CPU runs too
    stand_ins = install_stand_ins(original)
    if device.type == 'cuda':
        torch.cuda.set_device(device)  # the original's bare .cuda() calls go to the current device
        torch.backends.cudnn.benchmark = False  # as the original's scripts set them
        torch.backends.cudnn.deterministic = True
    else:
        run_cuda_calls_on_the_cpu()
    modules = import_original(original, stand_ins)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    figures = {}
    for stage, run in (('stage 0: SimCLR', bench_simclr), ('stage 1: BadEncoder', bench_badencoder),
                       ('stage 2: MIMIC distillation', bench_mimic), ('stage 2: MI estimation', bench_mi),
                       ('stage 3: downstream probe', bench_probe)):
        start = time.perf_counter()
        result = run(modules, args, device)
        if result is None:
            print(f'{stage}: left out (evaluation/nn_classifier.py is not in the checkout)', file=sys.stderr)
            continue
        figures.update(result)
        print(f'{stage}: {time.perf_counter() - start:.1f} s (original)', file=sys.stderr)
    extrapolated = [key for key in extrapolated_figures(args) if key in figures]
    print(json.dumps({**figures, 'extrapolated': extrapolated, 'stand_ins': stand_ins,
                      'threads': torch.get_num_threads(), 'num_workers': args.num_workers}), flush=True)


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # compare_original.py, which got the same Ctrl-C, reports it
        sys.exit(130)
