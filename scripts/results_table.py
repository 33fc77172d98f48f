#!/usr/bin/env python
"""Collect the paper-style results table from pipeline run directories.

A run directory is what `scripts/run_pipeline.sh` makes: `run.json` (the setting) and
`eval_clean/`, `eval_backdoored/`, `eval_mimic/`, each holding the `metrics.json` that
`training_downstream_classifier.py --results_dir` writes, and, for each baseline defence the pipeline ran
(`--defences`), `eval_<defence>/` beside `defence_<defence>/`. Each defence's folder holds
`stage_seconds.txt`, the wall time the pipeline measured for it.

    python scripts/results_table.py runs/cifar10_gtsrb runs/cifar10_svhn --out results/table
    # -> results/table.md and results/table.csv, one row per (pre-training set, downstream task, attack);
    #    with baseline defences also results/table_defences.csv and a second table in table.md,
    #    one row per (setting, defence): ACC, ASR, ASR*, ACC change against the backdoored encoder, time
    python scripts/results_table.py runs/demo --summary runs/demo/summary.json

Percentages throughout; ASR is counted as the original (over every triggered test image), and
`ASR*` excludes the test images whose true label is the target.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

ENCODERS = ('clean', 'backdoored', 'mimic')
BASELINES = ('ft', 'fp', 'nad', 'clp', 'anp', 'kd', 'invert')  # defences.BASELINES, in the pipeline's order
METRICS = (('acc', 'ACC'), ('asr', 'ASR'), ('asr_excluding_target', 'ASR*'))


class TableError(ValueError):
    """A run directory that does not hold what the table needs."""


def read_json(path: Path) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise TableError(f'{path}: no such file') from None
    except json.JSONDecodeError as error:
        raise TableError(f'{path}: not valid JSON ({error})') from None


def read_run(run_dir: Path) -> dict:
    """{'pretraining', 'downstream', 'clean': metrics | None, 'backdoored': ..., 'mimic': ...}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TableError(f'{run_dir}: no such run directory')
    setting = read_json(run_dir / 'run.json')
    row = {'run': str(run_dir), 'pretraining': setting.get('pretraining_dataset', '?'),
           'downstream': setting.get('downstream_dataset', '?')}
    found = False
    for encoder in ENCODERS:
        path = run_dir / f'eval_{encoder}' / 'metrics.json'
        row[encoder] = read_json(path) if path.is_file() else None
        found = found or row[encoder] is not None
    if not found:
        raise TableError(f'{run_dir}: no eval_*/metrics.json yet (has the pipeline reached stage 3?)')
    row['attack'] = setting.get('attack', 'badencoder')
    row['label'] = setting.get('label') or ''  # run_pipeline.sh --label: which variant of an experiment
    row['defences'] = {}
    for defence in BASELINES:
        path = run_dir / f'eval_{defence}' / 'metrics.json'
        if path.is_file():
            row['defences'][defence] = read_json(path)
    row['seconds'] = {name: stage_seconds(run_dir / folder) for name, folder in
                      [('mimic', 'mimic')] + [(d, f'defence_{d}') for d in row['defences']]}
    return row


def stage_seconds(folder: Path) -> float | None:
    """The wall time the pipeline measured for a stage (its stage_seconds.txt), or None."""
    try:
        return float((folder / 'stage_seconds.txt').read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def cell(metrics: dict | None, key: str) -> str:
    value = None if metrics is None else metrics.get(key)
    return '–' if value is None else f'{float(value):.2f}'


def labelled(runs: list[dict]) -> bool:
    return any(run['label'] for run in runs)


def setting_of(run: dict, with_label: bool) -> list[str]:
    return [run['pretraining'], run['downstream'], run['attack']] + ([run['label']] if with_label else [])


def header(with_label: bool = False) -> list[str]:
    return ['Pre-training', 'Downstream', 'Attack'] + ['Run'] * with_label + [
        f'{encoder} {label}' for encoder in ENCODERS for _, label in METRICS]


def rows_of(runs: list[dict]) -> list[list[str]]:
    with_label = labelled(runs)
    return [setting_of(r, with_label) + [cell(r[encoder], key) for encoder in ENCODERS for key, _ in METRICS]
            for r in runs]


def markdown(runs: list[dict]) -> str:
    head = header(labelled(runs))
    text = len(head) - len(ENCODERS) * len(METRICS)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * text + ['---:'] * (len(head) - text)) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows_of(runs)]
    note = ('\nACC: clean test accuracy (%). ASR: triggered test images classified as the target (%), '
            'over all test images as the original counts it; ASR*: excluding images of the target class.\n')
    return '\n'.join(lines) + '\n' + note


def csv_text(runs: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * labelled(runs) + [
        f'{encoder}_{key}' for encoder in ENCODERS
                                                     for key, _ in METRICS])
    for row in rows_of(runs):
        writer.writerow([value if value != '–' else '' for value in row])
    return buffer.getvalue()


def defence_rows(runs: list[dict]) -> list[dict]:
    """One row per (setting, defence): MIMIC first, then the baselines the run has; ACC change against the
    backdoored encoder of the same setting; the defence's wall time."""
    rows = []
    for run in runs:
        backdoored = (run['backdoored'] or {}).get('acc')
        for name, metrics in [('mimic', run['mimic'])] + list(run['defences'].items()):
            if metrics is None:
                continue
            acc = metrics.get('acc')
            rows.append({'pretraining': run['pretraining'], 'downstream': run['downstream'], 'attack': run['attack'],
                         'run': run['label'],
                         'defence': name, **{key: metrics.get(key) for key, _ in METRICS},
                         'acc_change': None if acc is None or backdoored is None else acc - backdoored,
                         'seconds': run['seconds'].get(name)})
    return rows


def defence_markdown(rows: list[dict]) -> str:
    with_label = any(row['run'] for row in rows)
    head = ['Pre-training', 'Downstream', 'Attack'] + ['Run'] * with_label + ['Defence', 'ACC', 'ASR', 'ASR*', 'ΔACC',
                                                                              'Time (s)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * (len(head) - 5) + ['---:'] * 5) + '|']
    for row in rows:
        values = [row['pretraining'], row['downstream'], row['attack']] + [row['run']] * with_label + [row['defence']]
        values += [cell(row, key) for key, _ in METRICS]
        values += ['–' if row['acc_change'] is None else f"{row['acc_change']:+.2f}",
                   '–' if row['seconds'] is None else f"{row['seconds']:.0f}"]
        lines.append('| ' + ' | '.join(values) + ' |')
    return '\n'.join(lines) + ('\n\nΔACC: ACC of the purified encoder minus that of the backdoored one (points). '
                                'Time: wall-clock seconds of the defence stage, as the pipeline measured it.\n')


def defence_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    columns = ['pretraining', 'downstream', 'attack', 'run', 'defence'] + [key for key, _ in METRICS] + ['acc_change',
                                                                                                   'seconds']
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({key: '' if row[key] is None else row[key] for key in columns})
    return buffer.getvalue()


def summary(run: dict) -> dict:
    """{'clean': {'acc', 'asr', 'asr_excluding_target'}, 'backdoored': ..., 'mimic': ...} of one run, and, when
    baseline defences ran, 'defences': {name: {'acc', 'asr', 'asr_excluding_target', 'seconds'}} (MIMIC too)."""
    result = {encoder: ({key: run[encoder].get(key) for key, _ in METRICS} if run[encoder] else None)
              for encoder in ENCODERS}
    if run['defences']:
        result['defences'] = {row['defence']: {**{key: row[key] for key, _ in METRICS}, 'seconds': row['seconds']}
                              for row in defence_rows([run])}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dirs', nargs='+', type=Path, help='pipeline run directories')
    parser.add_argument('--out', type=Path, help='write <out>.md and <out>.csv')
    parser.add_argument('--summary', type=Path, help='write the summary JSON of the (single) run here')
    args = parser.parse_args(argv)
    try:
        runs = [read_run(run_dir) for run_dir in args.run_dirs]
    except TableError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.summary and len(runs) != 1:
        print('error: --summary takes exactly one run directory', file=sys.stderr)
        return 2
    # by setting; runs of the same setting (an experiment's variants) keep the order they were given in
    runs.sort(key=lambda r: (r['pretraining'], r['downstream'], r['attack']))
    table = markdown(runs)
    compared = defence_rows(runs) if any(run['defences'] for run in runs) else []
    if compared:
        table += '\n## Defences\n\n' + defence_markdown(compared)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix('.md').write_text(table)
        args.out.with_suffix('.csv').write_text(csv_text(runs))
        if compared:
            args.out.with_name(args.out.name + '_defences.csv').write_text(defence_csv(compared))
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary(runs[0]), indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
