"""The one place that resolves the device and the precision of a run."""
from __future__ import annotations

import contextlib

import torch

from .errors import UsageError


def resolve_device(device: str, gpu: str = '0') -> torch.device:
    """The one device decision: 'auto' -> cuda:<gpu> when CUDA is present, else cpu."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
        return torch.device('cpu')
    if device == 'cuda':
        device = f"cuda:{str(gpu).split(',')[0] or '0'}"
    if not device.startswith('cuda:') or not device[5:].isdigit():
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got '{device}'")
    if not torch.cuda.is_available():
        raise UsageError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
    if int(device[5:]) >= torch.cuda.device_count():
        raise UsageError(f'--device {device}: only {torch.cuda.device_count()} CUDA device(s) present')
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context on the CPU."""
    if enabled and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()
