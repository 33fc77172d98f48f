"""Which process of a torchrun job this is, and how it ends: what the entry wrapper (`core.cli.run_main`) and the
data path need to know about a multi-process run, below the training side of it (`common.distributed`).

Without torchrun (no WORLD_SIZE > 1 in the environment) this is the only process: rank 0 of a world of one, which
prints and writes. Under torchrun, rank 0 alone prints (`quiet_unless_main` sends the others' stdout and stderr to
/dev/null) and writes files; a failure's one line comes from rank 0, or from the process that hit it
(`report_error`); a process that joined a process group ends through `leave_process`, never through the
interpreter's finalisation (`teardown`).
"""
from __future__ import annotations

import os
import re
import sys
import traceback

import torch.distributed as dist

INTERRUPT_GRACE_S = 1.0  # how long a process whose collective failed waits for a Ctrl-C torchrun may be forwarding


# ------------------------------------------------------------------------------------------ who am I

def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get('WORLD_SIZE', '1'))


def launched_rank() -> int:
    """This process's rank as torchrun set it (RANK), 0 without torchrun: known before the group is joined."""
    return int(os.environ.get('RANK', '0')) if launched_world_size() > 1 else 0


def is_distributed() -> bool:
    """True once this process has joined a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else launched_rank()


def is_main() -> bool:
    """Rank 0, the process that prints and writes (the only process without torchrun)."""
    return rank() == 0


# --------------------------------------------------------------------------------- start and end

def quiet_unless_main() -> None:
    """Send the stdout and stderr of every process but rank 0 to /dev/null (progress bars, notes, JSON lines);
    their errors still reach the terminal through `report_error`."""
    if launched_rank() != 0:
        devnull = open(os.devnull, 'w')
        sys.stdout = sys.stderr = devnull


def teardown() -> None:
    """Leave the process group: a last barrier (every process has finished its collectives and rank 0 its files),
    then destroy_process_group. Nothing in one process.

    destroy_process_group does not end gloo's threads: the DistributedDataParallel reducer and the autograd
    all-gather (C++ objects that Python's garbage collector cannot free) keep the backend alive, with its two
    `pt_gloo_runloop` threads and its `gloo_tcp_loop` thread, until the interpreter finalises. Freeing it there,
    among the interpreter's and C++'s static destructors, now and then aborts the process ("terminate called
    without an active exception", SIGABRT) after a complete run (pytorch/pytorch issues 107298 and 109478: the
    group outlives destroy_process_group; PR 179291: gloo's objects abort at finalisation). A process that
    joined a group therefore ends through `leave_process`, which skips finalisation.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def leave_process(status: int) -> None:
    """End a process of a torchrun job with `status` at once (os._exit, after flushing its output): no interpreter
    finalisation, so no destructor of the process group's leftover C++ objects runs (see `teardown`). Every file
    of a stage is written and closed (atomically) before this point; DataLoader workers and compile workers
    notice their parent is gone and end."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(status)


# ----------------------------------------------------------------------------------------- errors

COLLECTIVE_FAILURE = re.compile(r'gloo|nccl|connection closed by peer|connection reset|timed out', re.IGNORECASE)


def collective_failed(error: BaseException) -> bool:
    """Whether the error looks like a failed collective (gloo or NCCL): another process stopped, or the timeout.
    gloo reports a peer that went away as a plain RuntimeError, raised from torch.distributed or, inside
    DistributedDataParallel's backward, from the autograd engine; its message names the transport."""
    if isinstance(error, getattr(dist, 'DistError', ())):
        return True
    in_collectives = any(f'{os.sep}torch{os.sep}distributed{os.sep}' in frame.filename
                         for frame in traceback.extract_tb(error.__traceback__))
    return in_collectives or bool(COLLECTIVE_FAILURE.search(str(error)))


def record_for_torchrun(error: BaseException) -> None:
    """Hand the error, with its traceback, to torchrun's failure summary (its per-process error file)."""
    if os.environ.get('TORCHELASTIC_ERROR_FILE'):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(error)


def report_error(line: str, same_on_every_process: bool) -> None:
    """Print a failure's one line (as is in one process). Under torchrun: from rank 0 alone for what fails alike
    on every process (bad flags and files, a non-finite loss: the loss is averaged over the processes first) and
    for a collective that failed because another process stopped; from each process that raised it otherwise,
    prefixed with its rank."""
    current = launched_rank()
    if current == 0:
        print(line, file=sys.stderr)
    elif not same_on_every_process:
        print(f'[rank {current}] {line}', file=sys.__stderr__)
