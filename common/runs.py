"""Run directories: args.json, the CSV log, RNG states, guards against overwriting and resuming.

Under torchrun only rank 0 writes: the writers here do nothing in the other processes (core.processes).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import platform
import random
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from core import processes
from core.errors import UsageError
from core.files import write_text_atomic
from models import CheckpointError, Layout, save_atomic, save_in_layout
from models.checkpoint import encoder_checkpoint

REPO = Path(__file__).resolve().parents[1]  # the checkout whose commit a run records


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON, written atomically (`core.files`; rank 0 only under torchrun)."""
    if processes.is_main():
        write_text_atomic(path, json.dumps(obj, indent=2, default=str) + '\n')


def cpu_name() -> str:
    """The CPU as the operating system reports it, from the first processor's block of /proc/cpuinfo on Linux: its
    `model name` with its `cpu family` and `model` numbers (a virtual machine may name only the brand: 'AMD EPYC
    (family 25, model 17)'); on ARM, which has no model name, its `CPU implementer` and `CPU part` codes ('ARM
    (implementer 0x41, part 0xd40)'); else `platform.processor()` ('' where nothing says)."""
    try:
        fields = {}
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            key, _, value = line.partition(':')
            if not key.strip() and fields:
                break  # the end of the first processor's block
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    if 'model name' in fields:
        numbers = [f'{key.removeprefix("cpu ")} {fields[key]}' for key in ('cpu family', 'model') if key in fields]
        return fields['model name'] + (f' ({", ".join(numbers)})' if numbers else '')
    if 'CPU implementer' in fields:
        codes = [f'{key.removeprefix("CPU ")} {fields[key]}' for key in ('CPU implementer', 'CPU part')
                 if key in fields]
        return f'ARM ({", ".join(codes)})'
    return platform.processor()


@functools.lru_cache(maxsize=None)
def code_version(root: Path = REPO) -> str:
    """The git commit of the checkout at `root` (12 hex digits), with '-dirty' when a tracked file differs from it
    ('-unknown' when git could not tell in time); '' where `root` is not the top of a git checkout (a copy of the
    code inside another repository names no commit) or git is missing. Asked once per process."""
    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(['git', '--no-optional-locks', '-C', str(root), *command], capture_output=True,
                              text=True, timeout=30)
    try:
        top = git('rev-parse', '--show-toplevel')
        commit = git('rev-parse', '--short=12', 'HEAD')
    except (OSError, subprocess.SubprocessError):
        return ''
    if top.returncode != 0 or commit.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(root).resolve():
        return ''
    try:
        changed = git('status', '--porcelain', '--untracked-files=no')
    except subprocess.SubprocessError:
        return commit.stdout.strip() + '-unknown'
    if changed.returncode != 0:
        return commit.stdout.strip() + '-unknown'
    return commit.stdout.strip() + ('-dirty' if changed.stdout.strip() else '')


def run_environment() -> dict:
    """What a run's provenance needs besides its flags: the code (`code_version`), when this invocation started
    (UTC; a resumed stage writes args.json again, so it is the resumption's), and what decides its last digits:
    the torch version, the CPU threads, the CPU and the vector instructions torch's kernels use on it
    (`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2, ...). A seed repeats a run digit for digit only on
    the same thread count (it sets the order of floating-point sums) and the same kernels; another CPU kind is
    another draw."""
    return {'code': code_version(), 'started': datetime.now(timezone.utc).isoformat(timespec='seconds'),
            'torch': torch.__version__, 'cpu_threads': torch.get_num_threads(),
            'world_size': processes.world_size(), 'cpu': cpu_name(),
            'cpu_capability': torch.backends.cpu.get_cpu_capability()}


def write_args(results_dir: str | Path, args: argparse.Namespace) -> None:
    """`results_dir/args.json`: every flag of the run (`vars(args)`) and, under 'environment', `run_environment()`."""
    if processes.is_main():  # write_json writes in rank 0 alone; the other ranks need not ask git either
        write_json(Path(results_dir) / 'args.json', {**vars(args), 'environment': run_environment()})


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """The whole log, rewritten atomically (rows share the keys of the first)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
    if processes.is_main():
        write_text_atomic(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline='', encoding='utf-8') as handle:
        return list(csv.DictReader(handle))


def checkpoint_epochs(results_dir: str | Path, pattern: str) -> list[tuple[int, Path]]:
    """(epoch, path) of the checkpoints named like `pattern` ('model_{}.pth'), oldest first."""
    regex = re.compile('^' + re.escape(pattern).replace(r'\{\}', r'(\d+)') + '$')
    found = []
    for path in Path(results_dir).glob('*.pth'):
        match = regex.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def checked_checkpoints(results_dir: Path, pattern: str | tuple[str, ...], resume: bool, overwrite: bool,
                        outputs: tuple[str, ...] = ()) -> list[tuple[int, Path]]:
    """The checkpoints named like `pattern` (or any of several patterns) in `results_dir`, oldest first, once the
    folder is known to be usable: not a file; with `resume`, holding at least one; else holding none, nor any of
    the files `outputs` a finished run leaves there, unless `overwrite`. Creates nothing."""
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    if results_dir.exists() and not results_dir.is_dir():
        raise UsageError(f'--results_dir {results_dir}: exists and is not a folder')
    existing = sorted(found for each in patterns for found in checkpoint_epochs(results_dir, each)) \
        if results_dir.is_dir() else []
    if resume and not existing:
        raise UsageError(f'--resume: no checkpoint named {" or ".join(each.format("<epoch>") for each in patterns)} '
                         f'in {results_dir}')
    if existing and not (resume or overwrite):
        raise UsageError(f'--results_dir {results_dir}: already holds {existing[-1][1].name} from an earlier '
                         'run; pass --resume to continue it or --overwrite to replace it')
    for name in outputs:
        if (results_dir / name).exists() and not (resume or overwrite):
            raise UsageError(f'--results_dir {results_dir}: already holds {name} from an earlier run; pass '
                             '--overwrite to replace it')
    return existing


def prepare_results_dir(args: argparse.Namespace, pattern: str | tuple[str, ...],
                        outputs: tuple[str, ...] = ()) -> Path | None:
    """Create --results_dir and refuse to clobber an earlier run's checkpoints or `outputs`
    (`checked_checkpoints`).

    Returns the latest checkpoint to resume from (with --resume), else None.
    """
    if not args.results_dir:
        raise UsageError('--results_dir is required: the folder where this stage writes its outputs')
    results_dir = Path(args.results_dir)
    existing = checked_checkpoints(results_dir, pattern, args.resume, args.overwrite, outputs)
    if args.resume:
        return existing[-1][1]
    results_dir.mkdir(parents=True, exist_ok=True)
    return None


def rng_state() -> dict:
    """Python, numpy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    numpy = state['numpy']
    np.random.set_state(('MT19937', numpy['keys'].numpy().astype(np.uint32), numpy['pos'],
                         numpy['has_gauss'], numpy['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def check_resumable(checkpoint: dict, args: argparse.Namespace, path: Path, must_match: dict[str, object]) -> None:
    """A resumed run must continue the same run: a checkpoint of this project whose recorded values of the flags
    in `must_match` ({flag: default}, the flags marked `core.cli.same_on_resume`) equal the current ones. A flag
    the checkpoint does not record did not exist when it was written: that run had the flag's default."""
    recorded = checkpoint.get('args')
    if not isinstance(recorded, dict) or 'rng' not in checkpoint:
        raise CheckpointError(f'{path}: records no run arguments or RNG states (not written by this '
                              'project?); cannot resume from it')
    changed = [f'--{key.replace("knn_", "knn-")} {recorded.get(key, default)!r} -> {getattr(args, key)!r}'
               for key, default in must_match.items() if recorded.get(key, default) != getattr(args, key)]
    if changed:
        raise UsageError(f'--resume: {path} was written with other settings ({"; ".join(changed)}); '
                         'pass the original values')


# how an optimiser's update runs on this device, not its state: kept when a checkpoint from another device loads
IMPLEMENTATION_FLAGS = ('foreach', 'fused', 'capturable', 'differentiable')


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: dict, path: Path) -> int:
    """Load the optimiser state of a checkpoint; returns its epoch. CheckpointError when unusable.

    The optimiser keeps its own IMPLEMENTATION_FLAGS (a probe saved with foreach Adam on the CPU resumes fused on
    a GPU, and back). They are written into the checkpoint's groups before loading, because torch's
    load_state_dict places Adam's `step` by the loaded groups' flags: on the parameter's device for fused or
    capturable, where else a fused CUDA step fails on a CPU `step`. torch 2.0 never moves it, hence the loop after.
    """
    own = [{flag: group[flag] for flag in IMPLEMENTATION_FLAGS if flag in group} for group in optimizer.param_groups]
    try:
        state = checkpoint['optimizer']
        groups = [{**saved, **flags} for saved, flags in zip(state['param_groups'], own)]
        optimizer.load_state_dict({**state, 'param_groups': groups + state['param_groups'][len(groups):]})
        for group in optimizer.param_groups:
            if group.get('fused') or group.get('capturable'):
                for parameter in group['params']:
                    slots = optimizer.state.get(parameter, {})
                    if torch.is_tensor(slots.get('step')):
                        slots['step'] = slots['step'].to(parameter.device, torch.float32)
        return int(checkpoint['epoch'])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f'{path}: cannot resume, no usable optimizer state or epoch '
                              f'({type(error).__name__}: {error})') from None


def is_save_epoch(epoch: int, epochs: int, save_freq: int) -> bool:
    """Checkpoints are written every `save_freq` epochs (0: never in between) and after the last one."""
    return epoch == epochs or (save_freq > 0 and epoch % save_freq == 0)


def save_run_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        args: argparse.Namespace, **extra) -> None:
    """A self-describing, resumable checkpoint (docs/DESIGN.md §2.4), written atomically (by rank 0 alone under
    torchrun).

    `model` is the trained module itself, never its DistributedDataParallel or torch.compile wrapper, so the keys
    are the plain SimCLR ones; no state of one process is recorded, so a run resumes with any number of them.
    """
    if not processes.is_main():
        return
    save_atomic(encoder_checkpoint(model, optimizer, epoch, args=vars(args), rng=rng_state(), **extra), path)


TENSOR_LAYOUTS = ('bare', 'openai')  # layouts that hold the tower's tensors alone: no run state to resume from


def save_layout_checkpoint(path: Path, model: torch.nn.Module, layout: Layout, optimizer: torch.optim.Optimizer,
                           epoch: int, args: argparse.Namespace, **extra) -> None:
    """`save_run_checkpoint` for a real-world encoder: written in the layout of the file it was loaded from
    (models.save_in_layout), the file the released code loads strictly, with the run's state beside it in the
    released layouts (the TENSOR_LAYOUTS hold the tower alone); by rank 0 alone under torchrun."""
    if not processes.is_main():
        return
    save_in_layout(model, layout, path, epoch=epoch, optimizer=optimizer, resumable=True, args=vars(args),
                   rng=rng_state(), **extra)


def check_layout_resumable(layout: Layout | None, path: str, resume: bool, written: str) -> None:
    """--resume is refused for an encoder read from a TENSOR_LAYOUTS file: the `written` encoders are saved in its
    layout and hold no run state to resume from."""
    if layout is not None and layout.format in TENSOR_LAYOUTS and resume:
        raise UsageError(f'--resume: {path} is a {layout.format} state_dict (tensors only), and the {written} '
                         'encoders are written in its layout: they hold no run state to resume from')
