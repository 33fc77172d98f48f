"""Atomic file writing, the project's one way to put a file on disk (checkpoints, npz sets, JSON, CSV, copies).

A reader, or a run killed mid-write, sees either the old file or the complete new one. This module imports no
other module of the project, so every package builds on it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np


def default_file_mode() -> int:
    """The permissions `open(path, 'w')` would give a new file (0o666 less the umask).

    `tempfile.mkstemp` creates files readable by their owner only; files renamed into place get these
    permissions instead, so that an atomic write leaves the same file as a plain one.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 check: Callable[[Path], object] | None = None) -> None:
    """The project's one atomic file writer: `write(handle)` into a temporary file beside `path` (binary),
    flush, fsync, give it a plain file's mode, run `check(temporary path)` when given, then rename it over `path`.

    A reader (or a run killed mid-write) sees either the old file or the complete, checked new one; a failure
    leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """A small UTF-8 text file, written atomically."""
    write_atomic(path, lambda handle: handle.write(text.encode('utf-8')))


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                    check: Callable[[Path], object] | None = None) -> None:
    """np.savez through `write_atomic`, `check(temporary path)` before the rename: a reader sees the old file or
    the complete, checked new one, never a partial one."""
    write_atomic(path, lambda handle: np.savez(handle, **arrays), check)


def copy_atomic(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a file byte for byte through `write_atomic`."""
    with open(source, 'rb') as original:
        write_atomic(destination, lambda handle: shutil.copyfileobj(original, handle))
