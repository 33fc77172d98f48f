"""Checkpoints (docs/DESIGN.md §2.4): safe loading of untrusted files, atomic writing, self-describing contents.

A checkpoint is `{'epoch', 'state_dict', 'optimizer', ...}`; ours add the model config
(`arch`, `width`, `feature_dim`), the run arguments and the RNG states. Loading accepts such a dict or a
bare state_dict, always with `weights_only=True`: an encoder handed to a backdoor defence is untrusted
by definition and its pickle must never run code.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import CheckpointError
from core.files import write_atomic

from .simclr import ARCHITECTURES, PAPER_WIDTH, SimCLR


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (SIGINT) for the duration of the block, then raise KeyboardInterrupt after it.

    A KeyboardInterrupt raised inside torch.save's zip writer makes the writer's own cleanup fail with a
    RuntimeError ('unexpected pos ...') that hides the interrupt; deferring it to the end of the write
    keeps both the file and the one-line Ctrl-C report intact. Only the main thread receives signals, and
    only Python's default handler is replaced; anywhere else the block runs unchanged.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    except BaseException as error:  # the block failed (a full disk, say): the user's Ctrl-C still counts
        if received:
            raise KeyboardInterrupt from error
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save through `write_atomic`; a Ctrl-C during the write takes effect once the file is in place."""
    with interrupts_deferred():
        write_atomic(path, lambda handle: torch.save(obj, handle))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict a checkpoint file holds, loaded safely (weights_only=True) and as it is: a checkpoint dict or a
    bare state_dict.

    Raises CheckpointError naming the file when it is missing, unreadable, not a dict, or would need code
    execution to unpickle (refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else 'unsafe pickle'
        if 'weights_only' in reason or 'Unsupported' in str(error) or 'global' in str(error).lower():
            reason = 'it contains objects that would run code when unpickled'
        raise CheckpointError(f'{path}: refused to load: {reason} (only plain tensors and '
                              'containers are accepted, weights_only=True)') from None
    except Exception as error:  # truncated zip, not a torch file at all, a TorchScript archive, ...
        if 'TorchScript' in str(error):
            raise CheckpointError(f'{path}: refused to load: a TorchScript archive (as OpenAI publishes CLIP) runs '
                                  'code when loaded; save its state_dict where you trust it, e.g. torch.save('
                                  "clip.load(name, jit=False)[0].state_dict(), 'encoder.pt'), and pass that file") from None
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint '
                              f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""})') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a dict or state_dict, found {type(obj).__name__}')
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely; returns a dict with at least 'state_dict' (a bare state_dict is wrapped).

    Raises CheckpointError naming the file when it is missing, unreadable, or would need code
    execution to unpickle (refused, never run).
    """
    obj = read_checkpoint(path)
    if 'state_dict' not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {'state_dict': obj}  # a bare state_dict
        else:
            raise CheckpointError(f"{path}: no 'state_dict' in the checkpoint (keys: {sorted(obj)[:8]})")
    return obj


def _strip_prefix(state_dict: dict) -> dict:
    """Accept state_dicts saved from DataParallel / torch.compile wrappers."""
    for prefix in ('module.', '_orig_mod.'):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def infer_config(state_dict: dict) -> dict:
    """Architecture, width and projection size read off a SimCLR state_dict's keys and shapes."""
    if 'f.f.0.weight' not in state_dict:
        raise KeyError('f.f.0.weight')
    width = state_dict['f.f.0.weight'].shape[0]
    if any(k.startswith('f.f.3.0.conv3.') for k in state_dict):
        arch = 'resnet50'
    elif any(k.startswith('f.f.3.2.') for k in state_dict):
        arch = 'resnet34'
    else:
        arch = 'resnet18'
    feature_dim = state_dict['g.3.weight'].shape[0] if 'g.3.weight' in state_dict else 128
    return {'arch': arch, 'width': int(width), 'feature_dim': int(feature_dim)}


def describe_mismatch(expected: dict, found: dict, limit: int = 3) -> str:
    """The first differing keys and shapes between two state_dicts, as one short phrase."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k} {tuple(found[k].shape)} vs expected {tuple(expected[k].shape)}'
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f'missing {missing[:limit]}' + (f' and {len(missing) - limit} more' if len(missing) > limit else ''))
    if unexpected:
        parts.append(f'unexpected {unexpected[:limit]}' + (f' and {len(unexpected) - limit} more' if len(unexpected) > limit else ''))
    if shapes:
        parts.append('shape ' + '; '.join(shapes[:limit]))
    return ', '.join(parts)


def load_state_into(model: nn.Module, state_dict: dict, path: str | os.PathLike) -> None:
    """load_state_dict(strict) with a one-line CheckpointError naming the file and the first differences."""
    state_dict = _strip_prefix(state_dict)
    expected = model.state_dict()
    mismatch = describe_mismatch(expected, state_dict)
    if mismatch:
        raise CheckpointError(f'{path}: does not fit {type(model).__name__}'
                              f"{'(' + getattr(model, 'arch', '') + ')' if getattr(model, 'arch', '') else ''}: {mismatch}")
    model.load_state_dict(state_dict)


def encoder_config(checkpoint: dict, path: str | os.PathLike, arch: str | None = None) -> dict:
    """The SimCLR config of a checkpoint: recorded keys first, else read off the weights.

    `arch`, when given, is what the user expects; a different recorded or inferred one is an error.
    Original checkpoints record nothing and are resnet18 at width 64.
    """
    state_dict = _strip_prefix(checkpoint['state_dict'])
    try:
        config = infer_config(state_dict)
    except KeyError:
        raise CheckpointError(f'{path}: not a SimCLR encoder checkpoint (no f.f.0.weight; first keys: '
                              f'{list(state_dict)[:3]})') from None
    for key in ('arch', 'width', 'feature_dim', 'raw_inputs'):
        if key in checkpoint:
            config[key] = checkpoint[key]
    if config['arch'] not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {config['arch']!r}")
    if arch is not None and arch != config['arch']:
        raise CheckpointError(f"{path}: holds a {config['arch']} encoder, but {arch} was asked for")
    return config


def load_encoder(path: str | os.PathLike, arch: str | None = None) -> tuple[SimCLR, dict]:
    """Build the SimCLR a checkpoint describes and load its weights. Returns (model, checkpoint)."""
    checkpoint = load_checkpoint(path)
    config = encoder_config(checkpoint, path, arch)
    model = SimCLR(**config)
    load_state_into(model, checkpoint['state_dict'], path)
    return model, checkpoint


def encoder_checkpoint(model: SimCLR, optimizer: torch.optim.Optimizer | None, epoch: int,
                       **extra) -> dict:
    """The checkpoint dict of docs/DESIGN.md §2.4 for `model`, plus its config (an encoder's) and any extra keys."""
    return {'epoch': epoch, 'state_dict': model.state_dict(),
            'optimizer': optimizer.state_dict() if optimizer is not None else {},
            **getattr(model, 'config', {}), **extra}


__all__ = ['CheckpointError', 'save_atomic', 'read_checkpoint', 'load_checkpoint', 'load_encoder',
           'load_state_into', 'encoder_config', 'encoder_checkpoint', 'infer_config', 'describe_mismatch',
           'PAPER_WIDTH']
