"""Run every stage over a grid of small shapes and report how each run ended: no input may end a run by a signal.

    python -m scripts.investigate.sweep_shapes                     # the whole grid, a table on stdout
    python -m scripts.investigate.sweep_shapes --out docs/SWEEP_SHAPES.md --json runs/sweep.json
    python -m scripts.investigate.sweep_shapes --stages badencoder mimic --widths 4 8 --threads 2 --isa default
    python -m scripts.investigate.sweep_shapes --log runs/sweep.jsonl     # continue it after an interruption

Stages: 0 (clean), 1 (badencoder, drupe), 2 (mimic and each baseline defence, `defence:<name>`), 3 (probe).
Axes of the grid, each run a fresh process (`python <script> ...`, as a user runs it):
- data cases: `uneven` (set sizes not divisible by the batch: 100 pre-training images at batch 16, D = 50,
  45 downstream images), `batch_gt_set` (a batch of 32 larger than every set: 24 pre-training, 20 downstream
  images) and `one_reference` (`uneven` with a single reference input; only the stages that read references;
  DRUPE, which needs at least 2, refuses it: the check of that refusal);
- encoder widths 4, 8 and 16 (a ResNet18 whose downsample convolutions have 4..16 input channels);
- 1 and 2 threads (OMP_NUM_THREADS);
- ONEDNN_MAX_CPU_ISA unset (the CPU's best kernels) and AVX2;
- the tensor and PIL augmentation paths (`--augment`), for the stages that augment.
A run ends as `finished`, `error` (exit status 2, the last stderr line `error: ...` or `<prog>: error: ...` and no
traceback: a refused input, the line shown),
`signal <NAME>` (SIGSEGV, SIGABRT, ...), `hang` (killed at --timeout) or `exit <N>` (any other status, e.g. an
uncaught exception). The last three are failures: the script exits 1 if any run ended so.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as `python scripts/investigate/sweep_shapes.py` from anywhere
    sys.path.insert(0, str(REPO))

from datasets.synthetic import make_synthetic  # noqa: E402
from defences import BASELINES  # noqa: E402

PRETRAINING, DOWNSTREAM = 'synthetic_shapes', 'synthetic_digits'
TRIGGER = REPO / 'trigger' / 'trigger_pt_white_21_10_ap_replace.npz'
STAGES = ('clean', 'badencoder', 'drupe', 'mimic', *(f'defence:{name}' for name in BASELINES), 'probe')
AUGMENTING = {'clean', 'badencoder', 'drupe', 'mimic', 'defence:ft', 'defence:fp', 'defence:nad', 'defence:kd',
              'defence:invert'}
READS_REFERENCES = {'badencoder', 'drupe', 'probe'}
FAILURES = ('signal', 'hang', 'exit')


@dataclass(frozen=True)
class DataCase:
    pretraining: tuple[int, int]  # (train, test) images
    downstream: tuple[int, int]
    batch: int
    ratio: float  # of the pre-training split: D for MIMIC and the defences
    references: int


DATA_CASES = {
    'uneven': DataCase((100, 30), (45, 23), batch=16, ratio=0.5, references=3),
    'batch_gt_set': DataCase((24, 12), (20, 10), batch=32, ratio=1.0, references=3),
    'one_reference': DataCase((100, 30), (45, 23), batch=16, ratio=0.5, references=1),
}


@dataclass(frozen=True)
class Run:
    stage: str
    case: str
    width: int
    threads: int
    isa: str
    augment: str  # '-' for the stages that do not augment

    @property
    def name(self) -> str:
        return f'{self.stage}/{self.case}/w{self.width}/t{self.threads}/{self.isa}/{self.augment}'


def grid(stages, cases, widths, threads, isas, augments) -> list[Run]:
    """Every combination of the axes that applies to each stage (module docstring)."""
    runs = []
    for stage in stages:
        stage_cases = [case for case in cases if case != 'one_reference' or stage in READS_REFERENCES]
        if stage == 'defence:clp':  # data-free: the data case changes nothing it reads
            stage_cases = stage_cases[:1]
        stage_augments = augments if stage in AUGMENTING else ['-']
        for case, width, thread, isa, augment in itertools.product(stage_cases, widths, threads, isas, stage_augments):
            runs.append(Run(stage, case, width, thread, isa, augment))
    return runs


def prepare_inputs(work: Path, cases, widths) -> None:
    """Per data case a data root and reference file; per width a randomly initialised encoder."""
    from models import SimCLR, save_atomic
    from models.checkpoint import encoder_checkpoint
    for name in cases:
        case, root = DATA_CASES[name], work / name / 'data'
        for dataset, sizes in ((PRETRAINING, case.pretraining), (DOWNSTREAM, case.downstream)):
            (root / dataset).mkdir(parents=True, exist_ok=True)
            for index, (split, count) in enumerate(zip(('train', 'test'), sizes)):
                x, y = make_synthetic(dataset, count, seed=index + 1)
                np.savez(root / dataset / f'{split}.npz', x=x, y=y)
        x, y = make_synthetic(DOWNSTREAM, 100, seed=3)  # the references: digits 'one' drawn apart from the sets
        ones = x[y == 1][:case.references]
        np.savez(work / name / 'reference.npz', x=ones, y=np.ones(len(ones), dtype=np.int64))
    for width in widths:
        torch.manual_seed(width)
        save_atomic(encoder_checkpoint(SimCLR(width=width), None, 1), work / f'encoder_w{width}.pth')


def command(run: Run, work: Path, out: Path) -> list[str]:
    """The stage's command line for `run`, one epoch (or its smallest unit of work) at the case's shapes."""
    case, folder = DATA_CASES[run.case], work / run.case
    encoder = str(work / f'encoder_w{run.width}.pth')
    common = ['--data_root', str(folder / 'data'), '--device', 'cpu', '--num_workers', '0', '--no_progress',
              '--results_dir', str(out)]
    augment = [] if run.augment == '-' else ['--augment', run.augment]
    batch = ['--batch_size', str(case.batch)]
    if run.stage == 'clean':
        return ['train_clean_encoder.py', '--pretraining_dataset', PRETRAINING, '--width', str(run.width),
                '--epochs', '1', '--knn-k', '5', *batch, *augment, *common]
    if run.stage in ('badencoder', 'drupe'):
        drupe = ['--attack', 'drupe', '--drupe_warmup_epochs', '0', '--drupe_preserve_from', '1'] \
            if run.stage == 'drupe' else []
        return ['train_badencoder.py', '--pretraining_dataset', PRETRAINING, '--shadow_dataset', PRETRAINING,
                '--encoder_usage_info', PRETRAINING, '--downstreamTask', DOWNSTREAM, '--pretrained_encoder', encoder,
                '--trigger_file', str(TRIGGER), '--reference_file', str(folder / 'reference.npz'),
                '--shadow_fraction', '1.0', '--epochs', '1', *drupe, *batch, *augment, *common]
    if run.stage == 'mimic':
        return ['MIMIC.py', '--pretraining_dataset', PRETRAINING, '--teacher', encoder, '--ratio', str(case.ratio),
                '--epochs', '1', '--mi_epochs', '1', *batch, *augment, *common]
    if run.stage.startswith('defence:'):
        defence = run.stage.split(':', 1)[1]
        extra = {'anp': ['--anp_iterations', '2'], 'invert': ['--invert_steps', '2'],
                 'sslcleanse': ['--invert_steps', '2']}.get(defence, [])
        return ['baseline_defence.py', '--defence', defence, '--pretraining_dataset', PRETRAINING,
                '--teacher', encoder, '--ratio', str(case.ratio), '--epochs', '1', *extra, *batch, *augment, *common]
    if run.stage == 'probe':
        return ['training_downstream_classifier.py', '--dataset', DOWNSTREAM, '--encoder_usage_info', PRETRAINING,
                '--encoder', encoder, '--trigger_file', str(TRIGGER), '--reference_file', str(folder / 'reference.npz'),
                '--reference_label', '1', '--nn_epochs', '2', *batch, *common]
    raise ValueError(f'unknown stage {run.stage}')


def outcome(returncode: int | None, stderr: str) -> tuple[str, str]:
    """(outcome, detail) of a finished process: its exit status read as the module docstring says."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ''
    if returncode is None:
        return 'hang', ''
    if returncode == 0:
        return 'finished', ''
    if returncode < 0:
        return f'signal {signal_name(-returncode)}', last
    if returncode == 2 and 'Traceback' not in stderr and re.match(r'(\S+: )?error: ', last):
        return 'error', last  # the one-line error (a note printed before it is allowed)
    return f'exit {returncode}', last


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a signal without a name (a real-time one)
        return str(number)


def execute(run: Run, work: Path, timeout: float) -> dict:
    out = work / 'runs' / run.name.replace('/', '_').replace(':', '-')
    shutil.rmtree(out, ignore_errors=True)  # a run cut short before its result was logged starts afresh
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads), TQDM_DISABLE='1', PYTHONPATH=str(REPO))
    env.pop('ONEDNN_MAX_CPU_ISA', None)
    if run.isa != 'default':
        env['ONEDNN_MAX_CPU_ISA'] = run.isa
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *command(run, work, out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)
        result, detail = outcome(done.returncode, done.stderr)
    except subprocess.TimeoutExpired:
        result, detail = outcome(None, '')
        detail = f'killed after {timeout:.0f} s'
    return {**run.__dict__, 'outcome': result, 'detail': detail, 'seconds': round(time.perf_counter() - start, 1)}


def read_log(path: Path | None) -> dict[str, dict]:
    """The results a `--log` file already holds, by run name (a line cut short by a kill is skipped)."""
    done = {}
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[Run(*(result[key] for key in Run.__dataclass_fields__)).name] = result
    return done


def run_all(runs: list[Run], work: Path, timeout: float, jobs: int, log: Path | None = None) -> list[dict]:
    """Every run, its progress printed as it ends; the one-thread runs `jobs` at a time, the others one by one
    (a run of N threads alone on N cores). With `log`, each result is appended to it as one JSON line, and the
    runs it already holds are taken from it instead of run again. Results in the order of `runs`."""
    previous = read_log(log)
    results: dict[int, dict] = {index: previous[run.name] for index, run in enumerate(runs) if run.name in previous}
    if results:
        print(f'{len(results)} runs taken from {log}', flush=True)
    lock = threading.Lock()

    def report(index: int, result: dict) -> None:
        with lock:
            results[index] = result
            if log is not None:
                with open(log, 'a') as handle:
                    handle.write(json.dumps(result) + '\n')
            print(f"[{len(results)}/{len(runs)}] {runs[index].name}: {result['outcome']} ({result['seconds']} s)"
                  + (f" {result['detail']}" if result['detail'] else ''), flush=True)

    todo = [index for index in range(len(runs)) if index not in results]
    single = [index for index in todo if runs[index].threads == 1]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(execute, runs[index], work, timeout): index for index in single}
        for future in as_completed(futures):
            report(futures[future], future.result())
    for index in todo:
        if runs[index].threads != 1:
            report(index, execute(runs[index], work, timeout))
    return [results[index] for index in range(len(runs))]


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> str:
    return (f'CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, CPU capability '
            f'{torch.backends.cpu.get_cpu_capability()}; Python {platform.python_version()}')


def markdown(results: list[dict]) -> str:
    rows = ['| stage | data | width | threads | ONEDNN_MAX_CPU_ISA | augment | outcome | s | detail |',
            '|---|---|---:|---:|---|---|---|---:|---|']
    for r in results:
        detail = r['detail'].replace('|', '\\|')
        rows.append(f"| {r['stage']} | {r['case']} | {r['width']} | {r['threads']} | {r['isa']} | {r['augment']} | "
                    f"{r['outcome']} | {r['seconds']} | {detail} |")
    return '\n'.join(rows)


def summary(results: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        kind = r['outcome'].split()[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ', '.join(f'{kind} {count}' for kind, count in sorted(counts.items())) + f' (of {len(results)} runs)'


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Run every stage over a grid of small shapes; report how each '
                                                 'run ended (finished, one-line error, signal, hang).')
    parser.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES, metavar='STAGE',
                        help=f"stages to run (default: all: {' '.join(STAGES)})")
    parser.add_argument('--cases', nargs='+', default=list(DATA_CASES), choices=list(DATA_CASES),
                        help='data cases (default: all)')
    parser.add_argument('--widths', nargs='+', type=int, default=[4, 8, 16], help='encoder widths (default: 4 8 16)')
    parser.add_argument('--threads', nargs='+', type=int, default=[1, 2], help='thread counts (default: 1 2)')
    parser.add_argument('--isa', nargs='+', default=['default', 'AVX2'],
                        help='ONEDNN_MAX_CPU_ISA values; default = unset (default: default AVX2)')
    parser.add_argument('--augment', nargs='+', default=['tensor', 'pil'], choices=['tensor', 'pil'],
                        help='augmentation paths of the stages that augment (default: tensor pil)')
    parser.add_argument('--timeout', type=float, default=180, help='seconds before a run counts as a hang (default: 180)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='one-thread runs started at a time (default: 1); runs of more threads always run alone')
    parser.add_argument('--work', default='', help='folder for the inputs and runs (default: a temporary one, removed)')
    parser.add_argument('--out', default='', help='also write the table (markdown) to this file')
    parser.add_argument('--json', default='', help='also write the results as JSON to this file')
    parser.add_argument('--log', default='', metavar='FILE.jsonl',
                        help='append each result to this file as it ends; runs it already holds are not run again '
                             '(continue an interrupted sweep)')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if min(args.widths) < 1 or min(args.threads) < 1 or args.jobs < 1 or args.timeout <= 0:
        print('error: --widths, --threads and --jobs must be positive, --timeout > 0', file=sys.stderr)
        return 2
    runs = grid(args.stages, args.cases, args.widths, args.threads, args.isa, args.augment)
    print(header(), flush=True)
    print(f'{len(runs)} runs', flush=True)
    with tempfile.TemporaryDirectory(prefix='sweep_shapes_') as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        prepare_inputs(work, args.cases, args.widths)
        results = run_all(runs, work, args.timeout, args.jobs, Path(args.log) if args.log else None)
    table = markdown(results)
    print(table)
    print(summary(results))
    if args.out:
        Path(args.out).write_text(f'{header()}\n\n{summary(results)}\n\n{table}\n')
    if args.json:
        Path(args.json).write_text(json.dumps({'machine': header(), 'results': results}, indent=1) + '\n')
    failed = [r for r in results if r['outcome'].split()[0] in FAILURES]
    if failed:
        print(f'{len(failed)} run(s) did not end as finished or a one-line error: '
              + ', '.join(f"{r['stage']}/{r['case']}/w{r['width']}/t{r['threads']}/{r['isa']}/{r['augment']}"
                          for r in failed[:10]), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
