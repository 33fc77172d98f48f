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

Seeds: runs whose run.json are equal but for `seed` (`run_pipeline.sh --seeds 0,1,2` makes them, RUN/seed_<s>/)
are one setting measured n times. Their row holds, per cell, the mean ± the half-width of its 95% confidence
interval (Student's t with n - 1 degrees of freedom); the CSV has the mean in the usual column and `_std` (sample
standard deviation), `_ci95` (the half-width) and `_n` beside it, and `<out>_seeds.csv` one row per run. In the
defences table each baseline is also compared with MIMIC on the seeds both ran: the mean ± half-width of the
per-seed differences baseline - MIMIC of ACC, ASR and ASR*, in bold when the interval excludes zero.

    python scripts/results_table.py runs/demo/seed_* --out runs/demo/table --summary runs/demo/summary.json
    # summary.json: the means under the single run's keys, and n, <metric>_std, <metric>_ci95, per_seed
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ''):  # run as `python scripts/results_table.py`: the repository root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from defences import BASELINES  # noqa: E402  (the baselines' one list, in the pipeline's order; imports no torch)

ENCODERS = ('clean', 'backdoored', 'mimic')
METRICS = (('acc', 'ACC'), ('asr', 'ASR'), ('asr_excluding_target', 'ASR*'))


Z_975 = 1.959963984540054  # the standard normal's 0.975 quantile, the limit of t_{0.975, df}


class TableError(ValueError):
    """A run directory that does not hold what the table needs."""


# --- statistics over seeds ----------------------------------------------------------------------------------

def mean(values: list[float]) -> float:
    """x̄ = Σ x_i / n (n ≥ 1)."""
    return sum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """s = sqrt(Σ (x_i - x̄)² / (n - 1)), the sample standard deviation; None for n < 2."""
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(sum((x - centre) ** 2 for x in values) / (len(values) - 1))


def t_central_probability(t: float, df: int) -> float:
    """A(t | ν) = P(|T| < t) for Student's T with ν = df degrees of freedom (t ≥ 0), in closed form
    (Abramowitz & Stegun 26.7.3-4), with θ = atan(t / √ν) and c = cos θ:
    ν = 1: A = 2θ/π;
    ν odd > 1: A = (2/π)·(θ + sin θ·(c + (2/3)c³ + (2·4)/(3·5)c⁵ + ... + (2·4···(ν−3))/(3·5···(ν−2))·c^(ν−2)));
    ν even: A = sin θ·(1 + (1/2)c² + (1·3)/(2·4)c⁴ + ... + (1·3···(ν−3))/(2·4···(ν−2))·c^(ν−2))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # the k-th term, k = 1 .. (ν−1)/2, is c^(2k−1) times its ratio
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)  # ν = 1: no terms, 2θ/π
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # the k-th term, k = 1 .. ν/2, is c^(2k−2) times its ratio
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


@functools.lru_cache(maxsize=None)  # a bisection per df, asked for once per table cell
def t_975(df: int) -> float:
    """t_{0.975, df}, the 0.975 quantile of Student's t with df degrees of freedom: the t ≥ 0 at which
    `t_central_probability(t, df)` = 0.95, found by bisection for df ≤ 1000 (within about 1e-13, the accuracy of
    the sum); beyond, the Cornish-Fisher expansion in 1/df around z = Z_975 (Abramowitz & Stegun 26.7.5),
    t = z + g1/df + g2/df² + g3/df³ + g4/df⁴ with g1 = (z³ + z)/4, g2 = (5z⁵ + 16z³ + 3z)/96,
    g3 = (3z⁷ + 19z⁵ + 17z³ - 15z)/384, g4 = (79z⁹ + 776z⁷ + 1482z⁵ - 1920z³ - 945z)/92160
    (within 1e-13 of the exact quantile there; Z_975 as df → ∞). t_975(1) = tan(0.475π) = 12.7062..., t_975(2) =
    0.95·√(2/(1 − 0.95²)) = 4.3026...."""
    if df < 1:
        raise ValueError(f't_975: df must be at least 1, got {df}')
    if df <= 1000:
        low, high = Z_975, 13.0  # t_975 falls from 12.71 (df 1) towards Z_975
        while True:
            middle = (low + high) / 2
            if middle in (low, high):
                return middle
            low, high = (middle, high) if t_central_probability(middle, df) < 0.95 else (low, middle)
    z = Z_975
    g = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** power for power, term in enumerate(g, start=1))


def ci95_half_width(values: list[float]) -> float | None:
    """h = t_{0.975, n-1} · s / √n, the half-width of the 95% confidence interval x̄ ± h of the mean (Student's t,
    s the sample standard deviation); None for n < 2."""
    std = sample_std(values)
    return None if std is None else t_975(len(values) - 1) * std / math.sqrt(len(values))


def paired_differences(values: dict, reference: dict) -> dict:
    """{seed: d_s} with d_s = values[s] - reference[s], over the seeds both hold a number for (in the order of
    `values`): the pairs of a paired comparison, whose mean ± ci95_half_width is the interval of the difference."""
    return {seed: value - reference[seed] for seed, value in values.items()
            if value is not None and reference.get(seed) is not None}


@dataclass(frozen=True)
class Estimate:
    """A cell over seeds: n values, their mean, sample standard deviation and 95% half-width (None for n = 1)."""
    n: int
    mean: float
    std: float | None
    ci95: float | None

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95% interval mean ± ci95 lies wholly on one side of zero (never for n = 1)."""
        return self.ci95 is not None and abs(self.mean) > self.ci95


def estimate(values: list) -> Estimate | None:
    """The Estimate of the numbers among `values` (None ones are left out); None when there are none."""
    numbers = [float(value) for value in values if value is not None]
    if not numbers:
        return None
    return Estimate(len(numbers), mean(numbers), sample_std(numbers), ci95_half_width(numbers))


def read_json(path: Path) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise TableError(f'{path}: no such file') from None
    except json.JSONDecodeError as error:
        raise TableError(f'{path}: not valid JSON ({error})') from None


def read_run(run_dir: Path) -> dict:
    """{'pretraining', 'downstream', 'clean': metrics | None, 'backdoored': ..., 'mimic': ..., 'setting': run.json,
    'seed': run.json's seed or None, ...}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TableError(f'{run_dir}: no such run directory')
    setting = read_json(run_dir / 'run.json')
    row = {'run': str(run_dir), 'pretraining': setting.get('pretraining_dataset', '?'),
           'downstream': setting.get('downstream_dataset', '?'), 'setting': setting, 'seed': setting.get('seed')}
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


# --- runs that differ only in their seed --------------------------------------------------------------------

def setting_key(setting: dict) -> str:
    """A run.json without its seed, as text: two runs with the same key differ at most in their seed."""
    return json.dumps({key: value for key, value in setting.items() if key != 'seed'}, sort_keys=True)


def seed_groups(runs: list[dict]) -> list[list[dict]]:
    """The runs in groups of one setting measured with several seeds: runs whose run.json differ only in 'seed',
    one run per seed, in the order given. A run without a seed in its run.json, or whose seed its setting's group
    already holds, is kept apart (a group of its own, which later seeds of that setting join)."""
    groups, by_setting = [], {}
    for run in runs:
        key = setting_key(run['setting'])
        group = by_setting.get(key)
        if run['seed'] is None or group is None or any(seed_name(other) == seed_name(run) for other in group):
            group = []
            groups.append(group)
            if run['seed'] is not None:
                by_setting[key] = group
        group.append(run)
    return groups


def seed_name(run: dict) -> str:
    """The run's seed as summary.json's per_seed keys spell it."""
    return str(run['seed'])


def seeded(groups: list[list[dict]]) -> bool:
    """Whether any setting was measured with more than one seed (the tables then show intervals)."""
    return any(len(group) > 1 for group in groups)


# --- the results table ----------------------------------------------------------------------------------------

def cell(metrics: dict | None, key: str) -> str:
    value = None if metrics is None else metrics.get(key)
    return '–' if value is None else f'{float(value):.2f}'


def interval(value: Estimate | None, group_size: int = 1, signed: bool = False, digits: int = 2) -> str:
    """A cell as the Markdown table shows it: the mean, '± half-width' over several seeds, '(n=k)' when only k of
    the group's seeds have it; '–' when none has."""
    if value is None:
        return '–'
    text = f'{value.mean:+.{digits}f}' if signed else f'{value.mean:.{digits}f}'
    if value.ci95 is not None:
        text += f' ± {value.ci95:.{digits}f}'
    return text + (f' (n={value.n})' if value.n < group_size else '')


def labelled(runs: list[dict]) -> bool:
    return any(run['label'] for run in runs)


def setting_of(run: dict, with_label: bool) -> list[str]:
    return [run['pretraining'], run['downstream'], run['attack']] + ([run['label']] if with_label else [])


def header(with_label: bool = False, with_n: bool = False) -> list[str]:
    return ['Pre-training', 'Downstream', 'Attack'] + ['Run'] * with_label + ['n'] * with_n + [
        f'{encoder} {label}' for encoder in ENCODERS for _, label in METRICS]


def encoder_estimate(group: list[dict], encoder: str, key: str) -> Estimate | None:
    return estimate([(run[encoder] or {}).get(key) for run in group])


def rows_of(groups: list[list[dict]]) -> list[list[str]]:
    runs = [run for group in groups for run in group]
    with_label, with_n = labelled(runs), seeded(groups)
    return [setting_of(group[0], with_label) + [str(len(group))] * with_n +
            [interval(encoder_estimate(group, encoder, key), len(group)) for encoder in ENCODERS for key, _ in METRICS]
            for group in groups]


def markdown(groups: list[list[dict]]) -> str:
    runs = [run for group in groups for run in group]
    head = header(labelled(runs), seeded(groups))
    text = len(head) - len(ENCODERS) * len(METRICS) - seeded(groups)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * text + ['---:'] * (len(head) - text)) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows_of(groups)]
    note = ('\nACC: clean test accuracy (%). ASR: triggered test images classified as the target (%), '
            'over all test images as the original counts it; ASR*: excluding images of the target class.\n')
    if seeded(groups):
        note += ('n: the seeds of a setting (runs that differ only in their seed). With n > 1 a cell is the mean '
                 '± the half-width of its 95% confidence interval (Student\'s t, n - 1 degrees of freedom); '
                 '(n=k): measured on k of them.\n')
    return '\n'.join(lines) + '\n' + note


ESTIMATE_PARTS = ('', '_std', '_ci95', '_n')  # a cell's CSV columns over seeds: mean, std, half-width, n


def number_text(value: float | None) -> str:
    return '' if value is None else f'{value:.4f}'


def estimate_columns(value: Estimate | None) -> list[str]:
    """The CSV columns of ESTIMATE_PARTS for one cell (empty when not measured)."""
    if value is None:
        return [''] * len(ESTIMATE_PARTS)
    return [number_text(value.mean), number_text(value.std), number_text(value.ci95), str(value.n)]


def csv_text(groups: list[list[dict]]) -> str:
    """One row per setting; with seeds, the mean in each metric's column and its _std, _ci95 and _n beside it."""
    runs = [run for group in groups for run in group]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    if not seeded(groups):
        writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * labelled(runs) + [
            f'{encoder}_{key}' for encoder in ENCODERS for key, _ in METRICS])
        for row in rows_of(groups):
            writer.writerow([value if value != '–' else '' for value in row])
        return buffer.getvalue()
    with_label = labelled(runs)
    writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * with_label + ['n'] + [
        f'{encoder}_{key}{part}' for encoder in ENCODERS for key, _ in METRICS for part in ESTIMATE_PARTS])
    for group in groups:
        writer.writerow(setting_of(group[0], with_label) + [len(group)] + [
            value for encoder in ENCODERS for key, _ in METRICS
            for value in estimate_columns(encoder_estimate(group, encoder, key))])
    return buffer.getvalue()


def seeds_csv(groups: list[list[dict]]) -> str:
    """One row per run (seed) of the seeded table: its setting, seed, folder and metrics."""
    runs = [run for group in groups for run in group]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    with_label = labelled(runs)
    writer.writerow(['pretraining', 'downstream', 'attack'] + ['run'] * with_label + ['seed', 'run_dir'] + [
        f'{encoder}_{key}' for encoder in ENCODERS for key, _ in METRICS])
    for run in runs:
        writer.writerow(setting_of(run, with_label) + ['' if run['seed'] is None else run['seed'], run['run']] + [
            value if value != '–' else '' for value in (cell(run[encoder], key) for encoder in ENCODERS
                                                           for key, _ in METRICS)])
    return buffer.getvalue()


# --- the defences table ---------------------------------------------------------------------------------------

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


DEFENCE_VALUES = tuple(key for key, _ in METRICS) + ('acc_change', 'seconds')  # a defence row's cells


def defence_estimates(groups: list[list[dict]]) -> list[dict]:
    """defence_rows over seeds: one row per (setting, defence) with an Estimate per cell, and for a baseline the
    paired comparison with MIMIC, '<metric>_vs_mimic': the Estimate of the per-seed differences baseline - MIMIC
    over the seeds both ran ('pairs' of them)."""
    rows = []
    for group in groups:
        by_defence: dict[str, dict[str, dict]] = {}  # defence -> {seed: its row of that seed's run}
        for run in group:
            for row in defence_rows([run]):
                by_defence.setdefault(row['defence'], {})[seed_name(run)] = row
        mimic = by_defence.get('mimic', {})
        first = group[0]
        for name, by_seed in by_defence.items():
            row = {'pretraining': first['pretraining'], 'downstream': first['downstream'], 'attack': first['attack'],
                   'run': first['label'], 'defence': name, 'n': len(by_seed),
                   **{key: estimate([seed_row[key] for seed_row in by_seed.values()]) for key in DEFENCE_VALUES}}
            pairs = 0
            for key, _ in METRICS:
                differences = {} if name == 'mimic' else paired_differences(
                    {seed: seed_row[key] for seed, seed_row in by_seed.items()},
                    {seed: seed_row[key] for seed, seed_row in mimic.items()})
                row[f'{key}_vs_mimic'] = estimate(list(differences.values()))
                pairs = max(pairs, len(differences))
            row['pairs'] = pairs
            rows.append(row)
    return rows


def paired_cell(value: Estimate | None) -> str:
    """A paired difference as the Markdown table shows it: bold when its 95% interval excludes zero."""
    text = interval(value, signed=True)
    return f'**{text}**' if value is not None and value.excludes_zero else text


def seeded_defence_markdown(rows: list[dict]) -> str:
    with_label = any(row['run'] for row in rows)
    compared = [f'{label} - MIMIC' for _, label in METRICS]
    head = (['Pre-training', 'Downstream', 'Attack'] + ['Run'] * with_label +
            ['Defence', 'n', 'ACC', 'ASR', 'ASR*', 'ΔACC', 'Time (s)'] + compared)
    numeric = 6 + len(compared)
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '|'.join(['---'] * (len(head) - numeric) + ['---:'] * numeric) + '|']
    for row in rows:
        values = [row['pretraining'], row['downstream'], row['attack']] + [row['run']] * with_label
        values += [row['defence'], str(row['n'])]
        values += [interval(row[key], row['n']) for key, _ in METRICS]
        values += [interval(row['acc_change'], row['n'], signed=True), interval(row['seconds'], row['n'], digits=0)]
        values += [paired_cell(row[f'{key}_vs_mimic']) for key, _ in METRICS]
        lines.append('| ' + ' | '.join(values) + ' |')
    return '\n'.join(lines) + (
        '\n\nΔACC: ACC of the purified encoder minus that of the backdoored one (points). '
        'Time: wall-clock seconds of the defence stage, as the pipeline measured it. '
        'With n > 1 seeds: mean ± the half-width of the 95% confidence interval (Student\'s t). '
        'ACC/ASR/ASR* - MIMIC: a paired comparison, the baseline\'s value minus MIMIC\'s on the same seed, its mean '
        '± 95% half-width over the seeds both ran; in bold when the interval excludes zero (the two differ at the '
        '5% level). A positive ASR - MIMIC: the baseline leaves more of the backdoor than MIMIC; a negative '
        'ACC - MIMIC: it keeps less clean accuracy.\n')


def seeded_defence_csv(rows: list[dict]) -> str:
    """One row per (setting, defence): n, each cell's mean, _std and _ci95; the paired comparison with MIMIC
    ('pairs' seeds; per metric the mean difference, _std, _ci95 and _excludes_zero)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
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

def run_summary(run: dict) -> dict:
    """{'clean': {'acc', 'asr', 'asr_excluding_target'}, 'backdoored': ..., 'mimic': ...} of one run, and, when
    baseline defences ran, 'defences': {name: {'acc', 'asr', 'asr_excluding_target', 'seconds'}} (MIMIC too)."""
    result = {encoder: ({key: run[encoder].get(key) for key, _ in METRICS} if run[encoder] else None)
              for encoder in ENCODERS}
    if run['defences']:
        result['defences'] = {row['defence']: {**{key: row[key] for key, _ in METRICS}, 'seconds': row['seconds']}
                              for row in defence_rows([run])}
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


def summary(runs: list[dict]) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dirs', nargs='+', type=Path, help='pipeline run directories')
    parser.add_argument('--out', type=Path, help='write <out>.md and <out>.csv (with seeds also <out>_seeds.csv)')
    parser.add_argument('--summary', type=Path, help='write the summary JSON of the run here (of a single run, or '
                                                     'of the runs of one setting that differ only in their seed)')
    args = parser.parse_args(argv)
    try:
        runs = [read_run(run_dir) for run_dir in args.run_dirs]
    except TableError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    # by setting; runs of the same setting (an experiment's variants) keep the order they were given in
    runs.sort(key=lambda r: (r['pretraining'], r['downstream'], r['attack']))
    groups = seed_groups(runs)
    if args.summary and len(groups) != 1:
        print('error: --summary takes exactly one run directory, or the runs of one setting that differ only in '
              'their seed', file=sys.stderr)
        return 2
    table = markdown(groups)
    with_seeds = seeded(groups)
    compared = []
    if any(run['defences'] for run in runs):
        compared = defence_estimates(groups) if with_seeds else defence_rows(runs)
    if compared:
        table += '\n## Defences\n\n' + (seeded_defence_markdown(compared) if with_seeds else
                                        defence_markdown(compared))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix('.md').write_text(table)
        args.out.with_suffix('.csv').write_text(csv_text(groups))
        if with_seeds:
            args.out.with_name(args.out.name + '_seeds.csv').write_text(seeds_csv(groups))
        if compared:
            args.out.with_name(args.out.name + '_defences.csv').write_text(
                seeded_defence_csv(compared) if with_seeds else defence_csv(compared))
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary(groups[0]), indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
