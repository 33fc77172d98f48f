"""Run a chosen set of tests N times in a row, optionally beside a CPU-bound load, and report every failure.

    python -m scripts.repeat_tests -n 50 tests/stages/test_distributed.py              # 50 runs, the suite's own xdist
    python -m scripts.repeat_tests -n 50 --load 2 tests/stages/test_distributed.py     # beside 2 busy processes
    python -m scripts.repeat_tests -n 5 --core_dumps --pytest_args "-k stage1" tests/stages/test_distributed.py

Each run is `<this python> -m pytest -q <tests> <--pytest_args>` under pytest.ini's options (pytest-xdist over
the cores, as CI runs it). A run that fails names each failed test id; with --core_dumps every process may write
a core file (`ulimit -c unlimited`, the kernel's core_pattern decides where) and TORCH_SHOW_CPP_STACKTRACES=1
puts C++ frames into torch's errors. The last line sums it up: `<failed runs>/<runs> runs failed`; the exit
status is 0 when every run passed, 1 otherwise, 2 for a usage error, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from collections import Counter

FAILED = re.compile(r'^(?:FAILED|ERROR) (\S+)', re.MULTILINE)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m scripts.repeat_tests', description=__doc__.split('\n\n')[0])
    parser.add_argument('tests', nargs='+', help='test files, folders or ids, as pytest takes them')
    parser.add_argument('-n', '--runs', type=int, default=10, help='how many runs in a row (default: 10)')
    parser.add_argument('--load', type=int, default=0, metavar='K',
                        help='K busy processes (a CPU-bound loop each) beside the tests while they run (default: 0)')
    parser.add_argument('--pytest_args', default='', help='extra pytest arguments, one string (e.g. "-n 2 -x")')
    parser.add_argument('--core_dumps', action='store_true',
                        help='allow core files (ulimit -c unlimited) and set TORCH_SHOW_CPP_STACKTRACES=1')
    parser.add_argument('--stop_on_failure', action='store_true', help='stop after the first failed run')
    return parser


def busy() -> None:
    """A CPU-bound loop until killed (the load)."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2147483648


def failed_ids(output: str) -> list[str]:
    """The test ids that pytest's short summary (`-ra`) lists as FAILED or ERROR."""
    return FAILED.findall(output)


def unlimited_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def one_run(args: argparse.Namespace, env: dict) -> tuple[int, str]:
    command = [sys.executable, '-m', 'pytest', '-q', *args.tests, *shlex.split(args.pytest_args)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=unlimited_core if args.core_dumps else None)
    return done.returncode, done.stdout


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.runs < 1 or args.load < 0:
        print('error: -n must be at least 1 and --load at least 0', file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.core_dumps:
        env['TORCH_SHOW_CPP_STACKTRACES'] = '1'
    print(f'{args.runs} runs of {" ".join(args.tests)} on {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, load {args.load}', flush=True)
    loads = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for process in loads:
        process.start()
    failures, failed_runs, seconds = Counter(), 0, []
    try:
        for index in range(1, args.runs + 1):
            start = time.monotonic()
            status, output = one_run(args, env)
            seconds.append(time.monotonic() - start)
            ids = failed_ids(output)
            if status == 0:
                print(f'run {index}: passed ({seconds[-1]:.0f} s)', flush=True)
                continue
            failed_runs += 1
            failures.update(ids)
            print(f'run {index}: FAILED, exit status {status} ({seconds[-1]:.0f} s): '
                  f'{", ".join(ids) or "no test id (see the output below)"}', flush=True)
            print('\n'.join(output.splitlines()[-60:]), flush=True)
            if args.stop_on_failure:
                break
    except KeyboardInterrupt:
        return 130
    finally:
        for process in loads:
            process.kill()
    runs = len(seconds)
    for test_id, count in failures.most_common():
        print(f'{count:4d}  {test_id}')
    print(f'{failed_runs}/{runs} runs failed (median {sorted(seconds)[runs // 2]:.0f} s a run)')
    return 1 if failed_runs else 0


if __name__ == '__main__':
    sys.exit(main())
