#!/usr/bin/env python
"""Collect the paper-style results table from pipeline run directories.

A run directory is what `scripts/run_pipeline.sh` makes (scripts/results/runs.py lists its files): `run.json`
(the setting) and `eval_clean/`, `eval_backdoored/`, `eval_mimic/`, each holding the `metrics.json` that
`training_downstream_classifier.py --results_dir` writes, and, for each baseline defence the pipeline ran
(`--defences`), `eval_<defence>/` beside `defence_<defence>/`. Each defence's folder holds `stage_seconds.txt`,
the wall time the pipeline measured for it.

    python scripts/results_table.py runs/cifar10_gtsrb runs/cifar10_svhn --out results/table
    # -> results/table.md and results/table.csv, one row per (pre-training set, downstream task, attack);
    #    with baseline defences also results/table_defences.csv and a second table in table.md,
    #    one row per (setting, defence): ACC, ASR, ASR*, ACC change against the backdoored encoder, time
    python scripts/results_table.py runs/demo --summary runs/demo/summary.json

Percentages throughout; ASR is counted as the original (over every triggered test image), and
`ASR*` excludes the test images whose true label is the target.

Seeds: runs whose run.json are equal but for `seed` (`run_pipeline.sh --seeds 0,1,2` makes them, RUN/seed_<s>/)
are one setting measured n times; a single run is the case n = 1. With n > 1 a cell holds the mean ± the
half-width of its 95% confidence interval (Student's t with n - 1 degrees of freedom); the CSV has the mean in the
usual column and `_std` (sample standard deviation), `_ci95` (the half-width) and `_n` beside it, and
`<out>_seeds.csv` one row per run. In the defences table each baseline is also compared with MIMIC on the seeds
both ran: the mean ± half-width of the per-seed differences baseline - MIMIC of ACC, ASR and ASR*, in bold when
the interval excludes zero.

    python scripts/results_table.py runs/demo/seed_* --out runs/demo/table --summary runs/demo/summary.json
    # summary.json: the means under the single run's keys, and n, <metric>_std, <metric>_ci95, per_seed

Rendered blocks: a Markdown page (docs/RESULTS.md) holds tables between a marker that names the command rendering
them, run from the repository root (its run folders may be glob patterns, expanded here), and an end marker:

    <!-- rendered: python -m scripts.results_table docs/results/proportioned/*/seed_* --table encoders -->
    ...
    <!-- end rendered -->

    python -m scripts.results_table --check docs/RESULTS.md   # status 1 and a diff where a block differs
    python -m scripts.results_table --write docs/RESULTS.md   # render every block again, in place
"""
from __future__ import annotations

import argparse
import csv
import difflib
import glob
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ''):  # run as `python scripts/results_table.py`: the repository root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from defences import BASELINES  # noqa: E402  (imports no torch)
from scripts.results.runs import (ENCODER_ORDER, ENCODERS, METRICS, Run, RunError, read_run,  # noqa: E402
                                  seed_groups, seed_name)
from scripts.results.stats import Estimate, estimate, paired_differences  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLES = ('all', 'encoders', 'defences', 'seeds', 'curve', 'provenance')


# --- the rows: one per setting, a group of the runs that differ only in their seed (n = 1: a single run) ---------

def labelled(groups: list[list[Run]]) -> bool:
    return any(run.label for group in groups for run in group)


def seeded(groups: list[list[Run]]) -> bool:
    """Whether any setting was measured with more than one seed (the tables then show n and intervals)."""
    return any(len(group) > 1 for group in groups)


def setting_of(run: Run, with_label: bool) -> list[str]:
    return [run.pretraining, run.downstream, run.attack] + ([run.label] if with_label else [])


def setting_head(with_label: bool) -> list[str]:
    """The header of `setting_of`'s cells."""
    return ['Pre-training', 'Downstream', 'Attack'] + ['Run'] * with_label


def encoder_estimate(group: list[Run], encoder: str, key: str) -> Estimate | None:
    return estimate([run.metrics.get(encoder, {}).get(key) for run in group])


DEFENCE_VALUES = tuple(key for key, _ in METRICS) + ('acc_change', 'seconds')  # a defence row's cells


def defence_values(run: Run) -> dict[str, dict]:
    """{defence: its cells} of one run, MIMIC first, then the baselines it has: ACC, ASR, ASR*, the ACC change
    against the run's backdoored encoder, and the defence's wall time."""
    backdoored = run.metrics.get('backdoored', {}).get('acc')
    found = {}
    for name in ('mimic',) + BASELINES:
        metrics = run.metrics.get(name)
        if metrics is None:
            continue
        acc = metrics.get('acc')
        found[name] = {**{key: metrics.get(key) for key, _ in METRICS},
                       'acc_change': None if acc is None or backdoored is None else acc - backdoored,
                       'seconds': run.seconds.get(name)}
    return found


def has_baselines(groups: list[list[Run]]) -> bool:
    return any(name in run.metrics for group in groups for run in group for name in BASELINES)


def defence_rows(groups: list[list[Run]]) -> list[dict]:
    """One row per (setting, defence), MIMIC first: n (the seeds that ran it) and an Estimate per cell, and for a
    baseline the paired comparison with MIMIC, '<metric>_vs_mimic': the Estimate of the per-seed differences
    baseline - MIMIC over the seeds both ran ('pairs' of them)."""
    rows = []
    for group in groups:
        by_defence: dict[str, dict[str, dict]] = {}  # defence -> {seed: its cells on that seed}
        for run in group:
            for name, values in defence_values(run).items():
                by_defence.setdefault(name, {})[seed_name(run)] = values
        mimic = by_defence.get('mimic', {})
        first = group[0]
        for name, by_seed in by_defence.items():
            row = {'pretraining': first.pretraining, 'downstream': first.downstream, 'attack': first.attack,
                   'run': first.label, 'defence': name, 'n': len(by_seed),
                   **{key: estimate([values[key] for values in by_seed.values()]) for key in DEFENCE_VALUES}}
            pairs = 0
            for key, _ in METRICS:
                differences = {} if name == 'mimic' else paired_differences(
                    {seed: values[key] for seed, values in by_seed.items()},
                    {seed: values[key] for seed, values in mimic.items()})
                row[f'{key}_vs_mimic'] = estimate(list(differences.values()))
                pairs = max(pairs, len(differences))
            row['pairs'] = pairs
            rows.append(row)
    return rows


# --- Markdown -----------------------------------------------------------------------------------------------

def interval(value: Estimate | None, group_size: int = 1, signed: bool = False, digits: int = 2) -> str:
    """A cell as the Markdown table shows it: the mean, '± half-width' over several seeds, '(n=k)' when only k of
    the group's seeds have it; '–' when none has."""
    if value is None:
        return '–'
    text = f'{value.mean:+.{digits}f}' if signed else f'{value.mean:.{digits}f}'
    if value.ci95 is not None:
        text += f' ± {value.ci95:.{digits}f}'
    return text + (f' (n={value.n})' if value.n < group_size else '')


def paired_cell(value: Estimate | None) -> str:
    """A paired difference as the Markdown table shows it: bold when its 95% interval excludes zero."""
    text = interval(value, signed=True)
    return f'**{text}**' if value is not None and value.excludes_zero else text


def markdown_table(head: list[str], numeric: int, rows: list[list[str]]) -> str:
    """A Markdown table whose last `numeric` columns are right-aligned."""
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '|'.join(['---'] * (len(head) - numeric) + ['---:'] * numeric) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def header(with_label: bool = False, with_n: bool = False) -> list[str]:
    return setting_head(with_label) + ['n'] * with_n + [
        f'{encoder} {label}' for encoder in ENCODERS for _, label in METRICS]


def markdown(groups: list[list[Run]]) -> str:
    """The encoders table: one row per setting, the clean, backdoored and MIMIC encoders' ACC, ASR and ASR*."""
    with_label, with_n = labelled(groups), seeded(groups)
    rows = [setting_of(group[0], with_label) + [str(len(group))] * with_n +
            [interval(encoder_estimate(group, encoder, key), len(group)) for encoder in ENCODERS for key, _ in METRICS]
            for group in groups]
    note = ('\nACC: clean test accuracy (%). ASR: triggered test images classified as the target (%), '
            'over all test images as the original counts it; ASR*: excluding images of the target class.\n')
    if with_n:
        note += ('n: the seeds of a setting (runs that differ only in their seed). With n > 1 a cell is the mean '
                 '± the half-width of its 95% confidence interval (Student\'s t, n - 1 degrees of freedom); '
                 '(n=k): measured on k of them.\n')
    return markdown_table(header(with_label, with_n), len(ENCODERS) * len(METRICS) + with_n, rows) + '\n' + note


def defence_markdown(rows: list[dict], with_n: bool) -> str:
    """The defences table; `with_n` (some setting has several seeds) adds n and the paired comparisons with
    MIMIC."""
    with_label = any(row['run'] for row in rows)
    compared = [f'{label} - MIMIC' for _, label in METRICS] if with_n else []
    head = (setting_head(with_label) + ['Defence'] + ['n'] * with_n +
            ['ACC', 'ASR', 'ASR*', 'ΔACC', 'Time (s)'] + compared)
    cells = []
    for row in rows:
        values = [row['pretraining'], row['downstream'], row['attack']] + [row['run']] * with_label
        values += [row['defence']] + [str(row['n'])] * with_n
        values += [interval(row[key], row['n']) for key, _ in METRICS]
        values += [interval(row['acc_change'], row['n'], signed=True), interval(row['seconds'], row['n'], digits=0)]
        values += [paired_cell(row[f'{key}_vs_mimic']) for key, _ in METRICS] if with_n else []
        cells.append(values)
    note = ('\n\nΔACC: ACC of the purified encoder minus that of the backdoored one (points). '
            'Time: wall-clock seconds of the defence stage, as the pipeline measured it; a stage resumed after a '
            'stop is left out of it (n=k, or –), its recorded time counting only what remained.')
    if with_n:
        note += (' With n > 1 seeds: mean ± the half-width of the 95% confidence interval (Student\'s t). '
                 'ACC/ASR/ASR* - MIMIC: a paired comparison, the baseline\'s value minus MIMIC\'s on the same seed, '
                 'its mean ± 95% half-width over the seeds both ran; in bold when the interval excludes zero (the '
                 'two differ at the 5% level). A positive ASR - MIMIC: the baseline leaves more of the backdoor '
                 'than MIMIC; a negative ACC - MIMIC: it keeps less clean accuracy.')
    return markdown_table(head, 5 + with_n + len(compared), cells) + note + '\n'


def acc_asr_cell(metrics: dict | None) -> str:
    """A probe's metrics as one cell, 'ACC / ASR*' to one decimal; '–' for what is missing."""
    if metrics is None:
        return '–'
    return ' / '.join('–' if metrics.get(key) is None else f'{metrics[key]:.1f}'
                      for key in ('acc', 'asr_excluding_target'))


def seeds_markdown(groups: list[list[Run]]) -> str:
    """The per-seed table: one row per run (setting, seed), each encoder it evaluated as 'ACC / ASR*'."""
    runs = [run for group in groups for run in group]
    encoders = [name for name in ENCODER_ORDER if any(name in run.metrics for run in runs)]
    with_label = labelled(groups)
    rows = [setting_of(run, with_label) + [seed_name(run)] + [acc_asr_cell(run.metrics.get(name)) for name in encoders]
            for run in runs]
    head = setting_head(with_label) + ['Seed'] + encoders
    return (markdown_table(head, len(encoders), rows) + '\n\nEach cell: ACC / ASR* (%) of that encoder on that '
            'seed, one decimal.\n')


def curve_markdown(groups: list[list[Run]]) -> str:
    """MIMIC over its epochs: one row per run that probed its checkpoints (run_pipeline.sh --mimic_curve), each
    epoch as 'ACC / ASR*', and MIMIC's training loss at that epoch."""
    runs = [run for group in groups for run in group if run.mimic_curve]
    if not runs:
        raise RunError('--table curve: no run probed its MIMIC checkpoints (run_pipeline.sh --mimic_curve)')
    epochs = sorted({epoch for run in runs for epoch in run.mimic_curve})
    with_label = labelled(groups)
    rows = []
    for run in runs:
        loss = run.mimic_log.get('loss', {})
        rows.append(setting_of(run, with_label) + [seed_name(run)] + [
            '–' if epoch not in run.mimic_curve else
            acc_asr_cell(run.mimic_curve[epoch]) + (f' ({loss[epoch]:.1f})' if epoch in loss else '')
            for epoch in epochs])
    head = setting_head(with_label) + ['Seed'] + [f'epoch {epoch}' for epoch in epochs]
    return (markdown_table(head, len(epochs), rows) + '\n\nEach cell: ACC / ASR* (%) of MIMIC\'s checkpoint of '
            'that epoch, probed on its own, and in brackets its training loss at that epoch (mimic/log.csv).\n')


def recorded(environments: list[dict], key: str) -> str:
    """The distinct values the stages recorded under `key`, sorted and joined; 'not recorded' where none did."""
    values = sorted({str(environment[key]) for environment in environments if environment.get(key) not in (None, '')})
    return ', '.join(values) or 'not recorded'


def provenance_markdown(groups: list[list[Run]]) -> str:
    """One row per setting: what the args.json of its runs' stages recorded (common.runs.run_environment): the
    code, the CPU and its vector instructions, the CPU threads (and torchrun processes), the torch version, and the
    days the stages started; each distinct value once."""
    with_label = labelled(groups)
    rows = []
    for group in groups:
        environments = [environment for run in group for environment in run.environments.values()]
        if not environments:
            raise RunError(f'--table provenance: no stage of {group[0].path} recorded its environment in args.json')
        machines = sorted({environment['cpu'] + (f" ({environment['cpu_capability']})"
                                                 if environment.get('cpu_capability') else '')
                           for environment in environments if environment.get('cpu')})
        threads = recorded(environments, 'cpu_threads')
        worlds = [environment for environment in environments if environment.get('world_size') not in (None, 1)]
        if worlds:
            threads += f" (torchrun: {recorded(worlds, 'world_size')} processes)"
        days = sorted({environment['started'][:10] for environment in environments if environment.get('started')})
        started = 'not recorded' if not days else days[0] if days[0] == days[-1] else f'{days[0]} to {days[-1]}'
        rows.append(setting_of(group[0], with_label) + [
            str(len(group)), recorded(environments, 'code'), ', '.join(machines) or 'not recorded', threads,
            recorded(environments, 'torch'), started])
    head = setting_head(with_label) + ['n', 'Code', 'CPU', 'Threads', 'torch', 'Started']
    return (markdown_table(head, 0, rows) + '\n\nWhat the stages of its runs recorded in their args.json: the git '
            'commit of the code (-dirty: changed files), the CPU and the vector instructions its kernels used, the '
            "CPU threads, the torch version and the days they started (UTC); 'not recorded': by a version that did "
            'not record it.\n')


def render(groups: list[list[Run]], table: str = 'all') -> str:
    """The Markdown of `table`: 'encoders', 'defences', 'seeds' (every run's values), 'curve' (MIMIC's checkpoints
    over its epochs), 'provenance' (what the stages recorded of code, machine, threads and dates), or 'all' (the
    encoders table, then the defences table under a heading when a baseline ran)."""
    if table == 'encoders':
        return markdown(groups)
    if table == 'seeds':
        return seeds_markdown(groups)
    if table == 'curve':
        return curve_markdown(groups)
    if table == 'provenance':
        return provenance_markdown(groups)
    if table == 'defences':
        if not has_baselines(groups):
            raise RunError('--table defences: no baseline defence was evaluated in these runs')
        return defence_markdown(defence_rows(groups), seeded(groups))
    text = markdown(groups)
    if has_baselines(groups):
        text += '\n## Defences\n\n' + defence_markdown(defence_rows(groups), seeded(groups))
    return text


# --- CSV ------------------------------------------------------------------------------------------------------

ESTIMATE_PARTS = ('', '_std', '_ci95', '_n')  # a cell's CSV columns over seeds: mean, std, half-width, n


def number_text(value: float | None) -> str:
    return '' if value is None else f'{value:.4f}'


def estimate_columns(value: Estimate | None) -> list[str]:
    """The CSV columns of ESTIMATE_PARTS for one cell (empty when not measured)."""
    if value is None:
        return [''] * len(ESTIMATE_PARTS)
    return [number_text(value.mean), number_text(value.std), number_text(value.ci95), str(value.n)]


def csv_text(groups: list[list[Run]]) -> str:
    """One row per setting: each metric to two decimals; with seeds, n, and each metric's mean to four with its
    _std, _ci95 and _n beside it."""
    with_label, with_n = labelled(groups), seeded(groups)
    parts = ESTIMATE_PARTS if with_n else ('',)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * with_label + ['n'] * with_n + [
        f'{encoder}_{key}{part}' for encoder in ENCODERS for key, _ in METRICS for part in parts])
    for group in groups:
        values = []
        for encoder in ENCODERS:
            for key, _ in METRICS:
                value = encoder_estimate(group, encoder, key)
                values += estimate_columns(value) if with_n else ['' if value is None else f'{value.mean:.2f}']
        writer.writerow(setting_of(group[0], with_label) + [len(group)] * with_n + values)
    return buffer.getvalue()


def seeds_csv(groups: list[list[Run]]) -> str:
    """One row per run (seed) of the seeded table: its setting, seed, folder and metrics."""
    with_label = labelled(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * with_label + ['seed', 'run_dir'] + [
        f'{encoder}_{key}' for encoder in ENCODERS for key, _ in METRICS])
    for run in (run for group in groups for run in group):
        metrics = [run.metrics.get(encoder, {}).get(key) for encoder in ENCODERS for key, _ in METRICS]
        writer.writerow(setting_of(run, with_label) + ['' if run.seed is None else run.seed, str(run.path)] + [
            '' if value is None else f'{float(value):.2f}' for value in metrics])
    return buffer.getvalue()


def defence_csv(rows: list[dict], with_n: bool) -> str:
    """One row per (setting, defence): each cell's value; with seeds, n, each cell's mean, _std and _ci95, and
    the paired comparison with MIMIC ('pairs' seeds; per metric the mean difference, _std, _ci95 and
    _excludes_zero)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    if not with_n:
        writer.writerow(['pretraining', 'downstream', 'attack', 'run', 'defence'] + list(DEFENCE_VALUES))
        for row in rows:
            writer.writerow([row['pretraining'], row['downstream'], row['attack'], row['run'], row['defence']] +
                            ['' if row[key] is None else row[key].mean for key in DEFENCE_VALUES])
        return buffer.getvalue()
    writer.writerow(['pretraining', 'downstream', 'attack', 'run', 'defence', 'n'] +
                    [f'{key}{part}' for key in DEFENCE_VALUES for part in ('', '_std', '_ci95')] + ['pairs'] +
                    [f'{key}_vs_mimic{part}' for key, _ in METRICS
                     for part in ('', '_std', '_ci95', '_excludes_zero')])
    for row in rows:
        values = [row['pretraining'], row['downstream'], row['attack'], row['run'], row['defence'], row['n']]
        values += [column for key in DEFENCE_VALUES for column in estimate_columns(row[key])[:3]]
        values.append(row['pairs'])
        for key, _ in METRICS:
            difference = row[f'{key}_vs_mimic']
            values += estimate_columns(difference)[:3] + ['' if difference is None or difference.ci95 is None
                                                          else str(difference.excludes_zero).lower()]
        writer.writerow(values)
    return buffer.getvalue()


# --- summary.json ---------------------------------------------------------------------------------------------

def run_summary(run: Run) -> dict:
    """{'clean': {'acc', 'asr', 'asr_excluding_target'}, 'backdoored': ..., 'mimic': ...} of one run, and, when
    baseline defences ran, 'defences': {name: {'acc', 'asr', 'asr_excluding_target', 'seconds'}} (MIMIC too)."""
    result = {encoder: ({key: run.metrics[encoder].get(key) for key, _ in METRICS} if encoder in run.metrics
                        else None) for encoder in ENCODERS}
    if any(name in run.metrics for name in BASELINES):
        result['defences'] = {name: {**{key: values[key] for key, _ in METRICS}, 'seconds': values['seconds']}
                              for name, values in defence_values(run).items()}
    return result


def aggregate_entry(per_seed: dict) -> dict | None:
    """One encoder's or defence's summary over seeds, from {seed: its single-run entry or None}: each key of the
    single run holding the mean over the seeds that have it, then 'n' (the seeds that have the entry),
    '<key>_std', '<key>_ci95' and 'per_seed' ({seed: the single run's entry})."""
    present = {seed: entry for seed, entry in per_seed.items() if entry is not None}
    if not present:
        return None
    keys = list(next(iter(present.values())))
    estimates = {key: estimate([entry.get(key) for entry in present.values()]) for key in keys}
    result = {key: None if value is None else value.mean for key, value in estimates.items()}
    result['n'] = len(present)
    for key, value in estimates.items():
        result[f'{key}_std'] = None if value is None else value.std
        result[f'{key}_ci95'] = None if value is None else value.ci95
    result['per_seed'] = present
    return result


def summary(runs: list[Run]) -> dict:
    """run_summary of one run; of several runs of one setting that differ only in their seed, the same keys
    holding aggregate_entry's means, n, standard deviations, 95% half-widths and per-seed values."""
    if len(runs) == 1:
        return run_summary(runs[0])
    singles = {seed_name(run): run_summary(run) for run in runs}
    result = {encoder: aggregate_entry({seed: single[encoder] for seed, single in singles.items()})
              for encoder in ENCODERS}
    names = [name for single in singles.values() for name in single.get('defences', {})]
    if names:
        result['defences'] = {name: aggregate_entry({seed: single.get('defences', {}).get(name)
                                                     for seed, single in singles.items()})
                              for name in dict.fromkeys(names)}
    return result


# --- reading the runs -----------------------------------------------------------------------------------------

def read_groups(run_dirs: list[Path]) -> list[list[Run]]:
    """The runs, ordered by setting (runs of the same setting, an experiment's variants, in the order given), in
    groups of the runs that differ only in their seed."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    for run in runs:
        if not any(encoder in run.metrics for encoder in ENCODERS):
            raise RunError(f'{run.path}: no eval_*/metrics.json yet (has the pipeline reached stage 3?)')
    runs.sort(key=lambda run: (run.pretraining, run.downstream, run.attack))
    return seed_groups(runs)


# --- rendered blocks of a Markdown page -----------------------------------------------------------------------

COMMAND = 'python -m scripts.results_table'
BEGIN = re.compile(r'<!-- rendered: (?P<command>.*?) -->')
END = '<!-- end rendered -->'


@dataclass
class Block:
    """A rendered block of a page: its marker's line (0-based), its end marker's, and the command's arguments."""
    begin: int
    end: int
    arguments: str


def blocks(text: str, path: Path) -> list[Block]:
    """The rendered blocks of a page, each a marker line, the rendered lines and an end marker line."""
    found, open_block = [], None
    for number, line in enumerate(text.split('\n')):
        match = BEGIN.fullmatch(line.strip())
        if match:
            command = match['command']
            if open_block is not None:
                raise RunError(f'{path}:{number + 1}: a rendered block begins inside the one of line '
                               f'{open_block[0] + 1}')
            if not command.startswith(COMMAND + ' '):
                raise RunError(f"{path}:{number + 1}: a rendered block's command must be '{COMMAND} ...'")
            open_block = (number, command[len(COMMAND):].strip())
        elif line.strip() == END:
            if open_block is None:
                raise RunError(f'{path}:{number + 1}: {END} without a block')
            found.append(Block(open_block[0], number, open_block[1]))
            open_block = None
    if open_block is not None:
        raise RunError(f'{path}:{open_block[0] + 1}: a rendered block without {END}')
    return found


def block_text(arguments: str, where: str) -> str:
    """What the block's command renders: its run folders (glob patterns expanded, sorted) relative to the
    repository root, with --table; `where` names the block in errors."""
    args = get_args_parser().parse_args(shlex.split(arguments))
    if args.out or args.summary or args.check or args.write or not args.run_dirs:
        raise RunError(f"{where}: a rendered block's command takes run folders and --table, and writes no file")
    run_dirs = []
    for pattern in map(str, args.run_dirs):
        matches = sorted(glob.glob(str(REPO / pattern))) if glob.has_magic(pattern) else [str(REPO / pattern)]
        if not matches:
            raise RunError(f'{where}: {pattern} matches no run folder')
        run_dirs += map(Path, matches)
    return render(read_groups(run_dirs), args.table)


def rerendered(path: Path) -> tuple[str, list[tuple[Block, str, str]]]:
    """The page with every rendered block rendered again, and (block, its text, the new text) of each block."""
    text = path.read_text()
    lines = text.split('\n')
    found = blocks(text, path)
    changes = []
    for block in reversed(found):  # from the end, so that earlier blocks' line numbers stay
        old = '\n'.join(lines[block.begin + 1:block.end])
        new = block_text(block.arguments, f'{path}:{block.begin + 1}').rstrip('\n')
        lines[block.begin + 1:block.end] = new.split('\n')
        changes.insert(0, (block, old, new))
    return '\n'.join(lines), changes


def check_page(path: Path) -> list[str]:
    """A unified diff (page → rendered) for each rendered block of the page that differs from what its command
    renders; [] when every block is as rendered."""
    _, changes = rerendered(path)
    return [''.join(difflib.unified_diff((old + '\n').splitlines(True), (new + '\n').splitlines(True),
                                         f'{path}:{block.begin + 1} (the page)',
                                         f'{path}:{block.begin + 1} (rendered)'))
            for block, old, new in changes if old != new]


def write_page(path: Path) -> int:
    """Render every block of the page again, in place; the number of blocks that changed."""
    text, changes = rerendered(path)
    if text != path.read_text():
        path.write_text(text)
    return sum(old != new for _, old, new in changes)


def page_main(check: Path | None, write: Path | None) -> int:
    """--check PAGE: each differing block's diff and status 1, else 0; --write PAGE: render its blocks in place."""
    if write:
        print(f'{write}: {write_page(write)} rendered block(s) changed')
        return 0
    differences = check_page(check)
    print(''.join(differences), end='')
    if differences:
        print(f'error: {check}: {len(differences)} rendered block(s) differ from what their runs render; '
              f'`{COMMAND} --write {check}` renders them again', file=sys.stderr)
        return 1
    print(f'{check}: each of its {len(blocks(check.read_text(), check))} rendered block(s) is as its runs render it')
    return 0


# --------------------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dirs', nargs='*', type=Path, metavar='RUN_DIR', help='pipeline run directories')
    parser.add_argument('--out', type=Path, help='write <out>.md and <out>.csv (with seeds also <out>_seeds.csv)')
    parser.add_argument('--summary', type=Path, help='write the summary JSON of the run here (of a single run, or '
                                                     'of the runs of one setting that differ only in their seed)')
    parser.add_argument('--table', choices=TABLES, default='all',
                        help='which table to print: the encoders table, the defences table, both (default), '
                             "every run's values (seeds), MIMIC's checkpoints over its epochs (curve), or what "
                             'the stages recorded of code, CPU, threads, torch and dates (provenance)')
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument('--check', type=Path, metavar='PAGE',
                       help='render every marked block of this Markdown page again and compare: status 1 and a '
                            'diff of each block that differs (no RUN_DIR)')
    pages.add_argument('--write', type=Path, metavar='PAGE',
                       help='render every marked block of this Markdown page again, in place (no RUN_DIR)')
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    page = args.check or args.write
    if page and (args.run_dirs or args.out or args.summary):
        parser.error('--check and --write take a page, no run directories, --out or --summary')
    if not page and not args.run_dirs:
        parser.error('give the run directories (or --check / --write PAGE)')
    try:
        if page:
            return page_main(args.check, args.write)
        groups = read_groups(args.run_dirs)
        if args.summary and len(groups) != 1:
            print('error: --summary takes exactly one run directory, or the runs of one setting that differ only '
                  'in their seed', file=sys.stderr)
            return 2
        table = render(groups, args.table)
    except (RunError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(table)
    if args.out:
        with_n = seeded(groups)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix('.md').write_text(table)
        args.out.with_suffix('.csv').write_text(csv_text(groups))
        if with_n:
            args.out.with_name(args.out.name + '_seeds.csv').write_text(seeds_csv(groups))
        if has_baselines(groups):
            args.out.with_name(args.out.name + '_defences.csv').write_text(defence_csv(defence_rows(groups), with_n))
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary(groups[0]), indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
