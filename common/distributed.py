"""Runs over several processes with PyTorch's own distributed stack: torchrun, DistributedDataParallel,
SyncBatchNorm, collectives with gradients.

    torchrun --standalone --nproc_per_node 4 train_clean_encoder.py ...               # one node, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 MIMIC.py ...

Without torchrun (no WORLD_SIZE > 1 in the environment) every function here hands its input back unchanged,
so a plain run is the one it always was. Under torchrun:
- `setup(args)` joins the process group through torchrun's env:// rendezvous: NCCL on CUDA (one process per GPU,
  cuda:<LOCAL_RANK>), gloo on the CPU, a timeout on every collective (--dist_timeout), and refuses a --batch_size
  that the processes cannot share evenly: --batch_size is the global batch.
- Rank r trains on rows r·b .. (r+1)·b − 1 (b = batch / world size) of each global batch that one process would
  draw: the same (seed, epoch) permutation and, on the tensor path, the same augmentation draws
  (`datasets.fastpath`).
- `data_parallel(model)` wraps the trained network in DistributedDataParallel (gradients averaged over the
  processes; the engine alone calls it, `common.engine.Training.parallel`) and, on CUDA, turns its BatchNorm
  layers into torch.nn.SyncBatchNorm, so that they normalise with the statistics of the global batch.
  SyncBatchNorm does not run on the CPU: there (gloo) every process normalises with the statistics of its own
  part of the batch, and a BatchNorm that trains sees b images, not the batch. Frozen networks (BadEncoder's eval-mode BN, f0's cached features, MIMIC's teacher) need nothing.
- `nt_xent` takes its negatives from the global batch (an all-gather that keeps gradients); `gather` does the
  same for any per-sample tensor (stage 1 gathers its features and evaluates its objective on the global batch).
- Rank 0 alone prints (`core.processes.quiet_unless_main` sends the others' stdout and stderr to /dev/null),
  writes files (`common.runs` checks `core.processes.is_main`), runs the kNN monitors and MIMIC's MI step
  (`on_main` shares its result).

Which process this is (`core.processes.rank`, `world_size`, `is_main`) and how a process of a torchrun job ends
(`core.processes.teardown`, `leave_process`) sit in the bottom layer, where the data path and the entry wrapper
`core.cli.run_main` read them.
"""
from __future__ import annotations

import argparse
import inspect
import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from core import processes
from core.device import resolve_device
from core.errors import UsageError
from models.losses import nt_xent as nt_xent_one_process
from models.losses import nt_xent_anchors

DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar('T')


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        'multi-process runs (torchrun --nproc_per_node N <script> ...)',
        '--batch_size is the global batch, split evenly over the processes; rank 0 prints and writes every file. '
        'On CUDA (NCCL, one process per GPU: cuda:<LOCAL_RANK>, --gpu is ignored) the BatchNorm layers that train '
        'are synchronised (SyncBatchNorm). On the CPU (gloo) SyncBatchNorm does not run: each process normalises '
        'with the statistics of its own part of the batch.')
    group.add_argument('--dist_timeout', default=DEFAULT_TIMEOUT_S, type=float, metavar='SECONDS',
                       help='under torchrun, a collective that waits longer than this ends the run (another process '
                            'stopped, or rank 0 is still in a step the others wait for: the kNN monitor, MIMIC\'s MI '
                            f'step) (default: {DEFAULT_TIMEOUT_S:g})')


# ---------------------------------------------------------------------------------------- set-up

def rank_device(device: str) -> torch.device:
    """Under torchrun: cuda:<LOCAL_RANK> for --device auto (with CUDA) or cuda, the CPU for cpu (or auto without)."""
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
        return torch.device('cpu')
    if device != 'cuda':
        raise UsageError(f'--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; '
                         'pass --device cuda (or auto)')
    if not torch.cuda.is_available():
        raise UsageError('--device cuda: CUDA is not available on this machine (use --device cpu)')
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f'torchrun started LOCAL_RANK {local_rank}, but this node has only '
                         f'{torch.cuda.device_count()} CUDA device(s): lower --nproc_per_node')
    return torch.device('cuda', local_rank)


def setup(args: argparse.Namespace) -> torch.device:
    """The run's device. Without torchrun: `core.device.resolve_device(--device, --gpu)`, nothing else.

    Under torchrun: this process's device (`rank_device`), and it joins the process group (env://, NCCL on CUDA,
    gloo on the CPU) with --dist_timeout on its collectives; a --batch_size the processes cannot share evenly
    is refused first.
    """
    world = processes.launched_world_size()
    if world == 1:
        return resolve_device(args.device, args.gpu)
    timeout = getattr(args, 'dist_timeout', DEFAULT_TIMEOUT_S)
    if not timeout > 0:
        raise UsageError(f'--dist_timeout must be positive, got {timeout}')
    batch_size = getattr(args, 'batch_size', None)
    if batch_size is not None and batch_size % world:
        raise UsageError(f'--batch_size {batch_size} is the global batch and must split evenly over the {world} '
                         f'processes torchrun started (a multiple of {world})')
    device = rank_device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id (torch >= 2.3) binds NCCL to this process's GPU at once
        bind = {'device_id': device} if device.type == 'cuda' and 'device_id' in inspect.signature(
            dist.init_process_group).parameters else {}
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', init_method='env://',
                                timeout=timedelta(seconds=timeout), **bind)
    return device


def barrier() -> None:
    """Every process waits here for the others; nothing in one process. The epoch loops call it once rank 0 has
    written the epoch's log and checkpoint, so that a process that fails later cannot have torchrun stop rank 0
    before the epoch is on disk."""
    if processes.is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------- training

def data_parallel(model: torch.nn.Module, device: torch.device, *, sync_batchnorm: bool = True,
                  find_unused_parameters: bool = False, broadcast_buffers: bool = True) -> torch.nn.Module:
    """What the training step calls instead of `model`: `model` itself in one process; under torchrun its
    DistributedDataParallel wrapper (torch.compile'd again when `model` was a torch.compile wrapper, as
    compile(DDP(model)) is the supported order).

    With `sync_batchnorm` on CUDA, its BatchNorm layers become torch.nn.SyncBatchNorm first, in place: the
    module keeps its parameters (an optimiser built on them stays valid) and its state_dict keys. Checkpoints are
    always taken from `model` (or its `_orig_mod`), never from the wrapper, so they carry no `module.` prefix.
    `find_unused_parameters`: some trained parameters get no gradient in a step (a projection head whose output
    no loss uses).
    """
    if not processes.is_distributed():
        return model
    compiled_from = getattr(model, '_orig_mod', None)
    module = model if compiled_from is None else compiled_from
    if sync_batchnorm and device.type == 'cuda':
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        assert converted is module, 'a bare BatchNorm cannot be converted in place'
    # torch >= 2.14 names the per-forward buffer broadcast `forward_sync_buffers` (`broadcast_buffers` warns)
    buffers = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
        DistributedDataParallel.__init__).parameters else 'broadcast_buffers'
    wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda' else None,
                                      find_unused_parameters=find_unused_parameters, **{buffers: broadcast_buffers})
    return wrapped if compiled_from is None else torch.compile(wrapped)


def gather(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The tensors of every process concatenated along `dim` in rank order, gradients kept (the backward pass
    sums each process's share back to it); `tensor` itself in one process."""
    if not processes.is_distributed():
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    return all_gather_with_grad(moved).movedim(0, dim)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(W·n, ...): every process's (n, ...) tensor in rank order; the backward pass hands each process the sum
    over the processes of its share's gradients."""
    try:  # the functional collective torch 2.14 names as the replacement of the one below
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # older torch: the autograd all_gather of torch.distributed.nn (deprecated in 2.14)
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(tensor))
    return all_gather_single_autograd(tensor, 0, dist.group.WORLD)


def nt_xent(out_1: torch.Tensor, out_2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the global batch (docs/DESIGN.md §4.2, §14): `models.losses.nt_xent` in one process.

    Under torchrun, out_1, out_2 (b, D) are this process's rows r·b .. (r+1)·b − 1 of the global batch (B = W·b).
    Both are gathered with their gradients, and the loss is `nt_xent_anchors` with this process's 2b rows as the
    anchors and all 4B − 2 others of the global batch as the negatives: the mean of the W processes' values is the
    single-process loss L. Its gradient reaches every process's projections through the gather (whose backward
    sums over the processes), so process r's parameters receive Σ_r' ∂L_r'/∂θ through its own samples, and
    DistributedDataParallel's average over the W processes is (1/W) Σ_r' ∂L_r'/∂θ = ∂L/∂θ, the gradient of one
    process on the whole batch.
    """
    if not processes.is_distributed():
        return nt_xent_one_process(out_1, out_2, temperature)
    local = out_1.shape[0]
    start = processes.rank() * local
    return nt_xent_anchors(gather(out_1), gather(out_2), temperature, slice(start, start + local))


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over the processes of each (detached) scalar, in one all-reduce; `values` itself in one process.

    Per-sample means over equal shares of the global batch average to the global batch's mean, so the logged
    loss is the one a single process would log, and every process sees the same value (one non-finite loss
    stops every process at the same step).
    """
    if not processes.is_distributed():
        return values
    stacked = torch.stack([value.detach().to(torch.float64) for value in values.values()])  # (T,)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / processes.world_size()).unbind()))


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0 alone, its (picklable) result handed to every process; `compute()` in one process.
    For the steps that run once: MIMIC's MI estimation, a defence's trigger inversion."""
    if not processes.is_distributed():
        return compute()
    box = [compute() if processes.is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
