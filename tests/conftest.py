"""Shared fixtures: tiny synthetic datasets in the npz layout, a tiny encoder checkpoint, paths."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
COMPAT = SHARED / 'compat'

os.environ.setdefault('TQDM_DISABLE', '1')
# The wrappers (scripts/*.sh) start $PYTHON: the interpreter that runs the tests, not whatever `python` is first on
# PATH (with a virtual environment that is not activated, that one may lack the project's packages).
os.environ['PYTHON'] = sys.executable
torch.set_num_threads(1)  # the CI machine has 2 cores, shared with DataLoader workers


def requires_compat(*parts: str):
    """Skip (cleanly) when COMPAT, a copy of the paper's own files kept outside the repository, is absent."""
    path = COMPAT.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (the paper's files are optional)")


def _cpu_has_fused_adam() -> bool:
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True).step()
        return True
    except RuntimeError:
        return False


# the probe's CUDA optimiser (fused Adam) checked on the CPU, whose fused kernel torch has from 2.4
requires_cpu_fused_adam = pytest.mark.skipif(not _cpu_has_fused_adam(),
                                             reason='this torch has no fused Adam on the CPU')


class CornerCollapse(torch.nn.Module):
    """A planted trigger for DECREE's inversion: f(x) = g(x) + strength·w⁴·c on normalised size x size images, with
    random linear features g (norm about 0.5) swamped by a constant direction c as w, the mean brightness of the
    3x3 top-left corner in [0, 1], approaches white (strength 0: a clean encoder)."""

    def __init__(self, size: int, strength: float, dim: int = 16, *, normalization):
        super().__init__()
        self.strength = strength
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('mean', torch.tensor(normalization[0]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(normalization[1]).view(1, 3, 1, 1))
        self.g = torch.nn.Linear(3 * size * size, dim)
        self.register_buffer('c', torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean  # back to [0, 1]
        whiteness = pixels[:, :, :3, :3].mean(dim=(1, 2, 3))  # (B,)
        return self.g(pixels.flatten(1) - 0.5) + self.strength * whiteness.pow(4)[:, None] * self.c


def write_split(folder: Path, split: str, x: np.ndarray, y: np.ndarray | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{split}.npz'
    arrays = {'x': x} if y is None else {'x': x, 'y': y}
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope='session')
def data_root(tmp_path_factory) -> Path:
    """A data root with small synthetic sets: synthetic_shapes (pre-training), synthetic_digits."""
    from datasets.synthetic import make_synthetic
    root = tmp_path_factory.mktemp('data')
    for name, sizes in {'synthetic_shapes': {'train': 256, 'test': 128},
                        'synthetic_digits': {'train': 200, 'test': 100}}.items():
        for index, (split, n) in enumerate(sizes.items()):
            x, y = make_synthetic(name, n, seed=index + 1)
            write_split(root / name, split, x, y)
    return root


@pytest.fixture(scope='session')
def trigger_file(tmp_path_factory) -> Path:
    """A white 10x10 patch at rows/columns 21..30 (the paper's trigger), written by hand here."""
    t = np.zeros((1, 32, 32, 3), dtype=np.float64)
    tm = np.ones((1, 32, 32, 3), dtype=np.int64)
    t[:, 21:31, 21:31, :] = 255
    tm[:, 21:31, 21:31, :] = 0
    path = tmp_path_factory.mktemp('trigger') / 'trigger.npz'
    np.savez(path, t=t, tm=tm, info=np.array(['white_21_10', 'replace']))
    return path


@pytest.fixture(scope='session')
def reference_file(tmp_path_factory, data_root) -> Path:
    """One synthetic digit 'one' as the reference input, label 1."""
    with np.load(data_root / 'synthetic_digits' / 'train.npz') as d:
        x, y = d['x'], d['y']
    path = tmp_path_factory.mktemp('reference') / 'one.npz'
    np.savez(path, x=x[y == 1][:1], y=np.array([1], dtype=np.int64))
    return path


@pytest.fixture(scope='session')
def three_references(tmp_path_factory, data_root) -> Path:
    """Three synthetic digits 'one' as the references, label 1: DRUPE's reference count."""
    with np.load(data_root / 'synthetic_digits' / 'train.npz') as data:
        x, y = data['x'], data['y']
    path = tmp_path_factory.mktemp('reference') / 'one_n3.npz'
    np.savez(path, x=x[y == 1][:3], y=np.ones(3, dtype=np.int64))
    return path


@pytest.fixture(scope='session')
def tiny_encoder(tmp_path_factory) -> Path:
    """A randomly initialised width-8 resnet18 SimCLR checkpoint in our layout."""
    from models import SimCLR, save_atomic
    from models.checkpoint import encoder_checkpoint
    torch.manual_seed(0)
    model = SimCLR(width=8)
    path = tmp_path_factory.mktemp('encoder') / 'model_1.pth'
    save_atomic(encoder_checkpoint(model, None, 1), path)
    return path


def run_script(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stage script (or module) the way a user would, capturing its output."""
    env = dict(os.environ, TQDM_DISABLE='1', PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


ENTRY_POINTS = {'train_clean_encoder.py': 'train_clean_encoder', 'train_badencoder.py': 'train_badencoder',
                'MIMIC.py': 'MIMIC', 'baseline_defence.py': 'baseline_defence',
                'training_downstream_classifier.py': 'training_downstream_classifier'}


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """A stage run as `run_script` runs it, but inside this process: its `main(argv)` through `core.cli.run_main`
    (so the exit status and the one-line error are the script's), stdout and stderr captured. Seconds faster than
    a new interpreter; the tests of the process itself (signals, torchrun, the command line) keep `run_script`."""
    from core.cli import run_main
    module = importlib.import_module(ENTRY_POINTS[args[0]])
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(lambda: module.main(list(args[1:])))
        except SystemExit as leaving:
            status = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
        except Exception:  # an uncaught error: a traceback and status 1, as the interpreter would give
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """SIGINT raises KeyboardInterrupt in every test, and the processes a test starts get its default action, also
    when the suite itself was started with SIGINT ignored (`nohup`, a background job of a script), which the
    Ctrl-C tests would otherwise take for a run that ignores Ctrl-C. (exec resets a caught signal to its default,
    but keeps an ignored one ignored.)"""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
