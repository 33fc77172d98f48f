#!/usr/bin/env python
"""Keep the summaries of a finished run folder, the small files its tables and figures are made from, without its
checkpoints: what docs/results/ holds, so that every table of docs/RESULTS.md renders again from the repository.

    python -m scripts.keep_summaries runs/demo_seeds docs/results/demo_seeds
    # runs/demo_seeds/seed_0/{run.json, summary.json, eval_*/metrics.json, eval_*/log.csv, clean/log.csv, ...}
    #   -> docs/results/demo_seeds/seed_0/...  (the same tree, summaries only)
    python -m scripts.results_table docs/results/demo_seeds/seed_* --table defences   # the table, from them

Kept: the .json, .csv and .txt files (run.json, summary.json, each stage's args.json and log.csv, mi.json,
defence.json, each probe's metrics.json, stage_seconds.txt). Left: checkpoints (.pth), arrays (.npz: data,
references, triggers), printed logs (.log), the demo's and pipeline's `data/` folder at the top of RUN, and the
tables `results_table` derives from the rest (table.md, table.csv, table_seeds.csv, table_defences.csv). A kept
file that exists with the same content is left as it is; one with other content (a log that has grown since) is
refused unless --overwrite, so that nothing kept is replaced unasked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as `python scripts/keep_summaries.py`: the repository root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.files import copy_atomic  # noqa: E402  (the project's one atomic writer; imports no torch)

SUMMARY_SUFFIXES = ('.json', '.csv', '.txt')
DERIVED_TABLES = ('table.csv', 'table_seeds.csv', 'table_defences.csv')  # results_table's --out files
DATA_FOLDER = 'data'  # the synthetic sets the demo and the pipeline generate at the top of a run folder


class KeepError(Exception):
    """A run folder that cannot be kept as asked (one line for the user)."""


def is_summary(relative: Path) -> bool:
    """Whether the file at `relative` (to the run folder) is a summary: a .json, .csv or .txt file outside the
    run's top `data/` folder that is not one of results_table's derived tables."""
    return (relative.suffix in SUMMARY_SUFFIXES and relative.name not in DERIVED_TABLES
            and relative.parts[0] != DATA_FOLDER)


def summaries(run: Path) -> list[Path]:
    """The summaries under `run`, relative to it, sorted."""
    return sorted(relative for relative in (path.relative_to(run) for path in run.rglob('*') if path.is_file())
                  if is_summary(relative))


def keep(run: Path, out: Path, overwrite: bool = False) -> tuple[int, int]:
    """Copy `run`'s summaries to the same places under `out`; returns (files copied, files already there). Checks
    every destination first, so that a refusal copies nothing."""
    if not run.is_dir():
        raise KeepError(f'{run}: not a folder')
    if out.resolve().is_relative_to(run.resolve()):
        raise KeepError(f'{out} is inside {run}: keep the summaries somewhere else')
    found = summaries(run)
    if not found:
        raise KeepError(f'{run}: holds no summary (.json, .csv or .txt file): not a run folder?')
    unchanged = {relative for relative in found
                 if (out / relative).exists() and (out / relative).read_bytes() == (run / relative).read_bytes()}
    to_copy = [relative for relative in found if relative not in unchanged]
    clashes = [str(out / relative) for relative in to_copy if (out / relative).exists()]
    if clashes and not overwrite:
        raise KeepError(f'{len(clashes)} file(s) exist with other content, e.g. {clashes[0]}: '
                         'pass --overwrite to replace them')
    for relative in to_copy:
        copy_atomic(run / relative, out / relative)  # makes the folders it needs
    return len(to_copy), len(unchanged)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Copy a run folder's summaries (.json, .csv, .txt; no checkpoint, "
                                                 'data or printed log) to another folder, keeping its tree.')
    parser.add_argument('run', type=Path, help='the run folder (a pipeline run, a demo OUT, a folder of seeds)')
    parser.add_argument('out', type=Path, help='where its summaries go, e.g. docs/results/<name>')
    parser.add_argument('--overwrite', action='store_true', help='replace kept files whose content differs')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        copied, unchanged = keep(args.run, args.out, args.overwrite)
    except (KeepError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'{copied} file(s) copied to {args.out}, {unchanged} already there')
    return 0


if __name__ == '__main__':
    sys.exit(main())
