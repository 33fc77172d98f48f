#!/usr/bin/env python
"""Figures (PNG) from pipeline run directories (what `scripts/run_pipeline.sh` writes).

    python scripts/plot_results.py runs/cifar10_gtsrb --out figures
    python scripts/plot_results.py runs/ratio_0.01 runs/ratio_0.02 runs/ratio_0.04 --out figures  # + ACC/ASR vs ratio
    python scripts/plot_results.py runs/patch_* --x trigger_size --out figures
    python scripts/plot_results.py runs/experiment --out figures   # a folder of run directories: each of them

Per run directory (file names start with the run folder's name, RUN below):
  RUN_mi.png        mimic/mi.json: the MI estimate of each tapped layer per estimation epoch, MI_l (the mean of
                    the last 10), and the layer weights w_l with opt_l = base_l + 10000·w_l that MIMIC distils with
                    (uniform weights alone under --layer_weights uniform)
  RUN_probe.png     ACC and ASR (ASR* dashed) after every probe epoch of each evaluated encoder, from its probe's
                    RUN/eval_<name>/log.csv (for runs of earlier versions, which kept them only in the stage-3 log:
                    the JSON lines of RUN/eval.log naming "encoder": "eval_<name>", or RUN/eval_<name>.log)
  RUN_defences.png  ACC, ASR and ASR* of each encoder (clean, backdoored, MIMIC and the baseline defences present),
                    from RUN/eval_<name>/metrics.json
  RUN_mimic_curve.png  MIMIC over its epochs (run_pipeline.sh --mimic_curve 1): its training loss per epoch
                    (RUN/mimic/log.csv) and the ACC, ASR and ASR* of each checkpoint's own probe
                    (RUN/mimic_curve/mimic_<epoch>/metrics.json, the last epoch's from RUN/eval_mimic)
Across the run directories:
  SETTING_defences_mean.png
                    for runs that differ only in their seed (run_pipeline.sh --seeds: RUN/seed_<seed>/): the mean
                    ACC, ASR and ASR* of each encoder over the seeds with its 95% confidence interval (Student's t,
                    as scripts/results_table.py), each seed's value a dot; SETTING is the runs' common parent
                    folder (RUN), else the first run's name with _seeds
  trigger_<name>.png   each trigger file the runs used: a clean image (the first test image of the run's downstream
                       set when its data is found, else a synthetic one), the triggered image, and the difference
                       amplified to the full grey range
  acc_asr_vs_ratio.png / acc_asr_vs_trigger_size.png
                       ACC and ASR of each encoder against the clean-data fraction (run.json 'ratio') or the trigger
                       size (the side, in pixels, of a square of the area the trigger changes), one figure per
                       setting (pre-training set, downstream set, attack); --x picks the axis, by default the one in
                       which the runs differ (runs at the same value, e.g. seeds, are averaged, each shown as a dot,
                       the mean with its 95% confidence interval)

Matplotlib is an optional extra (`pip install -r requirements-plot.txt`); without it the script says so in one
line and exits with status 2, as it does for a run directory it cannot read.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

if __package__ in (None, ''):  # run as `python scripts/plot_results.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.cli import data_dir_for  # noqa: E402
from datasets import DATASETS, DataError, apply_trigger, get_info, load_split, load_trigger  # noqa: E402
from datasets.synthetic import make_synthetic  # noqa: E402
from defences import BASELINES  # noqa: E402
from scripts.results.runs import (ENCODER_ORDER, METRICS, Run, RunError, number, read_json, read_run,  # noqa: E402
                                  seed_groups)
from scripts.results.stats import estimate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MATPLOTLIB_MISSING = 'error: plotting needs matplotlib: pip install -r requirements-plot.txt'
LABELS = {'clean': 'clean', 'backdoored': 'backdoored', 'mimic': 'MIMIC'}
AXES = {'ratio': 'clean-data fraction (--ratio)', 'trigger_size': 'trigger size (side of a square of its area, px)'}
MAX_TRIGGERS_SHOWN = 4


class PlotError(RunError):
    """Run directories that cannot be plotted (not found, their trigger file not found, no sweep along --x); one
    line for the user. A file in a run directory that cannot be read is the reader's RunError."""


class MatplotlibMissing(ImportError):
    """matplotlib, the optional extra the figures need, is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing(MATPLOTLIB_MISSING) from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------------------
# Run directories (read by scripts/results/runs.py)

def named(run: Run, name: str) -> str:
    """`name` and the run's setting, for figure titles."""
    return f'{name} ({run.pretraining} → {run.downstream}, {run.attack})'


def run_title(run: Run) -> str:
    """The run's name (run_pipeline.sh --label, else its name in file names) and setting, for figure titles."""
    return named(run, run.label or run.name)


def run_dirs(paths: list[Path]) -> list[Path]:
    """The run directories named, a folder of run directories standing for each run directory in it."""
    found = []
    for path in paths:
        if not path.is_dir():
            raise PlotError(f'{path}: no such run directory')
        if (path / 'run.json').is_file():
            found.append(path)
            continue
        inside = sorted(child for child in path.iterdir() if (child / 'run.json').is_file())
        if not inside:
            raise PlotError(f'{path}: no run.json, neither a run directory (scripts/run_pipeline.sh --run_dir) '
                            'nor a folder of them')
        found.extend(inside)
    return found


def unique_tags(paths: list[Path]) -> list[str]:
    """Each run's name for file names: its folder name, with the parent's when two share it, numbered if need be."""
    tags = [path.name for path in paths]
    tags = ['_'.join(path.parts[-2:]) if tags.count(tag) > 1 else tag for path, tag in zip(paths, tags)]
    return [f'{tag}_{index}' if tags.count(tag) > 1 else tag for index, tag in enumerate(tags, start=1)]


def resolve(path_text: str) -> Path | None:
    """A path recorded by the pipeline (which runs from the repository root), as it is found from here."""
    if not path_text:
        return None
    path = Path(path_text).expanduser()
    for candidate in ([path] if path.is_absolute() else [REPO / path, path]):
        if candidate.exists():
            return candidate
    return None


def trigger_size(trigger) -> float:
    """The side (px) of a square of the area trigger 0 changes: the pixels it does not keep as they are
    (mask < 1, or an added value); for the paper's 10x10 patch, 10."""
    changed = ((trigger.mask[0] < 1) | (trigger.patch[0] != 0)).any(axis=-1)  # (H, W)
    return math.sqrt(int(changed.sum()))


def run_trigger(run: Run):
    """(path, Trigger) of the run's trigger file."""
    path = resolve(run.setting.get('trigger_file', ''))
    if path is None:
        raise PlotError(f"{run.path / 'run.json'}: trigger_file '{run.setting.get('trigger_file', '')}' not found "
                        f'(looked under {REPO} and here)')
    return path, read_trigger(str(path.resolve()))


@functools.lru_cache(maxsize=None)
def read_trigger(path: str):
    try:
        return load_trigger(path)
    except DataError as error:
        raise PlotError(str(error)) from None


def x_value(run: Run, axis: str) -> float:
    if axis == 'ratio':
        ratio = run.setting.get('ratio')
        if ratio is None:
            raise PlotError(f"{run.path / 'run.json'}: no 'ratio'")
        return float(number(ratio, run.path / 'run.json', 'ratio'))
    return trigger_size(run_trigger(run)[1])


# ---------------------------------------------------------------------------------------------------
# Figures

def save(plt, figure, path: Path, title: str, written: list[Path]) -> None:
    """Title the figure (also kept as the PNG's Title metadata) and write it."""
    figure.suptitle(textwrap.fill(title, int(figure.get_figwidth() * 10)))  # about 10 characters an inch
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches='tight', metadata={'Title': title})  # at savefig.dpi (--dpi)
    plt.close(figure)
    written.append(path)
    print(f'wrote {path}')


def label(name: str) -> str:
    return LABELS.get(name, name.upper() if name in BASELINES else name)


def plot_mi(plt, run: Run, out: Path, written: list[Path]) -> None:
    report = run.mi
    layers = list(report['mi']) if report['mi'] is not None else list(report.get('layers') or
                                                                       [f'layer {i + 1}' for i in
                                                                        range(len(report['weights']))])
    stages = report.get('layers') or {}  # e.g. {'layer3': 'f.f.3 (ResNet layer1)'}
    names = [f"{layer}\n{str(stages[layer]).split('(')[-1].rstrip(')')}" if layer in stages else layer
             for layer in layers]
    nonfinite = report.get('nonfinite') or {}
    if report['mi'] is None:
        figure, axes = plt.subplots(1, 1, figsize=(5, 3.8), constrained_layout=True)
        weight_axis = axes
        title = f'{run_title(run)}: MIMIC layer weights, uniform (--layer_weights uniform, no MI step)'
    else:
        figure, (history_axis, mi_axis, weight_axis) = plt.subplots(1, 3, figsize=(16, 4.2),
                                                                     constrained_layout=True)
        history = report.get('history') or {}
        for layer in layers:
            values = history.get(layer) or []
            history_axis.plot(range(1, len(values) + 1), values, marker='.' if len(values) < 30 else None,
                              label=layer)
        epochs = max((len(v) for v in history.values()), default=0)
        if epochs:
            history_axis.axvspan(max(epochs - 9, 1) - 0.5, epochs + 0.5, color='grey', alpha=0.15,
                                 label='averaged for MI')
        history_axis.set(title='MI estimate per estimation epoch', xlabel='epoch', ylabel='DV bound (nats)')
        history_axis.legend(fontsize=8)
        values = [float(report['mi'][layer]) for layer in layers]
        bars = mi_axis.bar(names, values, color='tab:blue')
        mi_axis.bar_label(bars, labels=[f'{v:.3g}' + (f'\n{nonfinite[layer]} non-finite' if nonfinite.get(layer)
                                                      else '') for v, layer in zip(values, layers)], fontsize=8)
        mi_axis.set(title='MI of each tapped layer with the feature', ylabel='MI (nats)')
        mi_axis.margins(y=0.2)
        fell_back = ' - every MI was 0: weights fell back to uniform' if report.get('fell_back') else ''
        title = (f"{run_title(run)}: MIMIC's mutual information per tapped layer ({report.get('mi_model', '?')}) "
                 f'and the layer weights it gives{fell_back}')
    bars = weight_axis.bar(names, report['weights'], color='tab:green')
    for axis in figure.axes:
        axis.tick_params(axis='x', labelsize=8)
    weight_axis.bar_label(bars, labels=[f'w={w:.3f}\nopt={o:.0f}' for w, o in zip(report['weights'], report['opt'])],
                          fontsize=8)
    weight_axis.set(title='layer weights w (opt = base + 10000·w)', ylabel='w',
                    ylim=(0, (max(report['weights']) or 1) * 1.35))
    save(plt, figure, out / f'{run.name}_mi.png', title, written)


def plot_probe(plt, run: Run, out: Path, written: list[Path]) -> None:
    """ACC and ASR per probe epoch, one colour per encoder (ASR* dashed), one legend beside the two panels."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4), constrained_layout=True)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    if len(run.curves) > len(colours):  # more encoders than the default cycle has colours: tab20's, all distinct
        colours = [plt.get_cmap('tab20')(index) for index in range(20)]
    handles = []
    for index, (name, curves) in enumerate(run.curves.items()):
        colour = colours[index % len(colours)]
        for axis, keys in zip(axes, (('acc',), ('asr', 'asr_excluding_target'))):
            for key in keys:
                points = sorted(curves.get(key, {}).items())
                if not points:
                    continue
                line, = axis.plot(*zip(*points), '--' if key == 'asr_excluding_target' else '-', color=colour,
                                  label=label(name), marker='.' if len(points) < 30 else None)
                if key == 'acc':
                    handles.append(line)
    for axis, name in zip(axes, ('ACC: clean test accuracy', 'ASR (solid) and ASR* (dashed): triggered → target')):
        axis.set(title=name, xlabel='probe epoch', ylabel='%', ylim=(-2, 102))
    figure.legend(handles=handles, loc='outside right center', fontsize=8)
    save(plt, figure, out / f'{run.name}_probe.png', f'{run_title(run)}: downstream probe, ACC and ASR after each '
         'epoch (ASR* dashed: target-class images excluded)', written)


def plot_mimic_curve(plt, run: Run, out: Path, written: list[Path]) -> None:
    """MIMIC's training loss per epoch (left) and its checkpoints' ACC, ASR and ASR* (right)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    loss = sorted(run.mimic_log.get('loss', {}).items())
    if loss:
        axes[0].plot(*zip(*loss), color='tab:purple')
    axes[0].set(title='MIMIC: training loss per epoch', xlabel='MIMIC epoch', ylabel='loss')
    epochs = list(run.mimic_curve)
    for key, name in METRICS:
        axes[1].plot(epochs, [run.mimic_curve[epoch][key] for epoch in epochs], '--' if key != 'acc' else '-',
                     marker='o', label=name)
    axes[1].set(title="each checkpoint's probe", xlabel='MIMIC epoch', ylabel='%', ylim=(-2, 102))
    axes[1].legend(fontsize=8)
    save(plt, figure, out / f'{run.name}_mimic_curve.png', f'{run_title(run)}: MIMIC over its epochs', written)


def grouped_bars(axis, groups: list[str], values: dict[str, list[float | None]],
                 intervals: dict[str, list[float | None]] | None = None,
                 points: dict[str, list[list[float]]] | None = None) -> None:
    """Bars of several metrics side by side for each group; a missing value leaves a gap. With `intervals`, each
    bar (a mean) gets an error bar of that half-width; with `points`, the values it is the mean of, as dots."""
    width = 0.8 / len(values)
    positions = np.arange(len(groups))
    for index, (metric, heights) in enumerate(values.items()):
        shown = [np.nan if h is None else h for h in heights]
        centres = positions + (index - (len(values) - 1) / 2) * width
        errors = None
        if intervals is not None:
            errors = [0.0 if e is None else e for e in intervals[metric]]
        bars = axis.bar(centres, shown, width, label=metric, yerr=errors, capsize=3 if errors else 0)
        axis.bar_label(bars, labels=['' if h is None else f'{h:.1f}' for h in heights], fontsize=7)
        for centre, dots in zip(centres, (points or {}).get(metric, [])):
            axis.scatter([centre] * len(dots), dots, color='black', s=6, zorder=3)
    axis.set_xticks(positions, groups)


def plot_defences(plt, run: Run, out: Path, written: list[Path]) -> None:
    names = list(run.metrics)
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4), constrained_layout=True)
    grouped_bars(axis, [label(name) for name in names],
                 {title: [run.metrics[name].get(key) for name in names] for key, title in METRICS})
    axis.set(ylabel='%', ylim=(0, 118))  # room above 100 for the legend
    axis.legend(fontsize=8, ncol=3, loc='upper center')
    epochs = {run.metrics[name].get('epoch') for name in names} - {None}
    probe = f", {'/'.join(str(e) for e in sorted(epochs))}-epoch probe" if epochs else ''
    save(plt, figure, out / f'{run.name}_defences.png',
         f'{run_title(run)}: ACC, ASR and ASR* per encoder and defence{probe}', written)


def same_setting_but_seed(runs: list[Run]) -> list[list[Run]]:
    """The groups of several runs that differ only in their seed."""
    return [group for group in seed_groups(runs) if len(group) > 1]


def group_tags(groups: list[list[Run]]) -> list[str]:
    """Each seed group's name for file names: its runs' common parent folder, else the first run's tag + _seeds;
    numbered when two share one."""
    tags = []
    for members in groups:
        parents = {run.path.resolve().parent for run in members}
        tags.append(parents.pop().name if len(parents) == 1 else f'{members[0].name}_seeds')
    return [f'{tag}_{index}' if tags.count(tag) > 1 else tag for index, tag in enumerate(tags, start=1)]


def plot_seed_means(plt, members: list[Run], tag: str, out: Path, written: list[Path]) -> None:
    """ACC, ASR and ASR* per encoder over the seeds of one setting: the mean, its 95% interval, each seed a dot."""
    names = [name for name in ENCODER_ORDER if any(name in run.metrics for run in members)]
    names += sorted({name for run in members for name in run.metrics} - set(names))
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4), constrained_layout=True)
    values = {title: [[run.metrics[name][key] for run in members if run.metrics.get(name, {}).get(key) is not None]
                      for name in names] for key, title in METRICS}
    estimates = {title: [estimate(cells) for cells in per_name] for title, per_name in values.items()}
    grouped_bars(axis, [label(name) for name in names],
                 {title: [None if e is None else e.mean for e in per_name] for title, per_name in estimates.items()},
                 {title: [None if e is None else e.ci95 for e in per_name] for title, per_name in estimates.items()},
                 values)
    axis.set(ylabel='%', ylim=(0, 118))
    axis.legend(fontsize=8, ncol=3, loc='upper center')
    seeds = ', '.join(str(run.setting.get('seed')) for run in members)
    title = named(members[0], members[0].label or tag)
    save(plt, figure, out / f'{tag}_defences_mean.png',
         f'{title}: ACC, ASR and ASR* per encoder and defence, mean and 95% interval over {len(members)} seeds '
         f'({seeds}; dots: each seed)', written)


def sample_image(runs: list[Run], image_size: int) -> tuple[np.ndarray, str]:
    """The first test image of a run's downstream set when its prepared data is found (the data folder its
    evaluation used), else a synthetic image; uint8 (H, W, 3) and where it came from."""
    for run in runs:
        dataset = run.setting.get('downstream_dataset', '')
        for args_path in sorted(run.path.glob('eval_*/args.json')):
            try:
                args = Namespace(**read_json(args_path))
                data_dir = resolve(str(data_dir_for(args, dataset)))
                if data_dir is None:
                    continue
                x, _ = load_split(dataset, 'test', data_dir)
            except (RunError, DataError, TypeError):
                continue
            if len(x) and x.shape[1] == image_size:
                return x[0], f'{dataset} test image 0'
    synthetic = [name for name in DATASETS if get_info(name).synthetic]
    name = next((r.setting.get('downstream_dataset') for r in runs
                 if r.setting.get('downstream_dataset') in synthetic), synthetic[0])
    x, _ = make_synthetic(name, 1, seed=0)
    if x.shape[1] != image_size:
        raise PlotError(f'no {image_size}x{image_size} image to show the trigger on (the runs\' data was not found '
                        f'and the synthetic images are {x.shape[1]}x{x.shape[1]})')
    return x[0], f'synthetic image ({name})'


def plot_trigger(plt, path: Path, trigger, runs: list[Run], png: Path, written: list[Path]) -> None:
    image, source = sample_image(runs, trigger.image_size)
    shown = min(len(trigger), MAX_TRIGGERS_SHOWN)
    figure, axes = plt.subplots(shown, 3, figsize=(9, 3.2 * shown), squeeze=False, constrained_layout=True)
    for k in range(shown):
        triggered = apply_trigger(image, trigger, k)
        difference = np.abs(triggered.astype(np.int16) - image.astype(np.int16))  # (H, W, 3)
        gain = 255.0 / difference.max() if difference.max() > 0 else 1.0
        amplified = np.clip(difference * gain, 0, 255).astype(np.uint8)
        for axis, picture, name in zip(axes[k], (image, triggered, amplified),
                                       ('clean', f'triggered (trigger {k})', f'|difference| × {gain:.3g}')):
            axis.imshow(picture, interpolation='nearest')
            axis.set_title(name, fontsize=9)
            axis.axis('off')
    info = f" [{', '.join(trigger.info)}]" if trigger.info else ''
    more = f', first {shown} of {len(trigger)} triggers' if len(trigger) > shown else ''
    save(plt, figure, png, f'Trigger {path.name}{info}: {source}, triggered, and the '
         f'change amplified (trigger 0, the one the probe applies: size {trigger_size(trigger):.3g} px{more})', written)


def settings(runs: list[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """The runs grouped by setting: (pre-training set, downstream set, attack)."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        s = run.setting
        key = (str(s.get('pretraining_dataset', '?')), str(s.get('downstream_dataset', '?')),
               str(s.get('attack', 'badencoder')))
        groups.setdefault(key, []).append(run)
    return groups


def varies(runs: list[Run], axis: str) -> bool:
    return len({x_value(run, axis) for run in runs}) > 1


def sweeps(runs: list[Run], requested: str) -> list[tuple[tuple[str, str, str], str, list[Run]]]:
    """(setting, axis, its runs) for each setting whose runs differ along the axis: --x, or in auto the one of
    ratio and trigger size in which they differ (a setting whose runs differ in both needs --x)."""
    found = []
    for key, members in settings(runs).items():
        if len(members) < 2:
            continue
        if requested != 'auto':
            if varies(members, requested):
                found.append((key, requested, members))
            continue
        varying = []
        for axis in AXES:
            try:
                if varies(members, axis):
                    varying.append(axis)
            except RunError:
                continue  # e.g. a trigger file not found: that axis cannot be the automatic one
        if len(varying) > 1:
            raise PlotError(f"the {' → '.join(key[:2])} ({key[2]}) runs differ in both ratio and trigger size: "
                            'pick the axis with --x ratio|trigger_size')
        if varying:
            found.append((key, varying[0], members))
    return found


def plot_sweep(plt, key: tuple[str, str, str], axis_name: str, members: list[Run], out: Path, suffix: str,
               written: list[Path]) -> None:
    """ACC and ASR of each encoder against the axis, for the runs of one setting."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    names = [name for name in ENCODER_ORDER if any(name in run.metrics for run in members)]
    names += sorted({name for run in members for name in run.metrics} - set(names))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for index, name in enumerate(names):
        for axis, metric in zip(axes, ('acc', 'asr')):
            points = [(x_value(run, axis_name), run.metrics[name][metric]) for run in members
                      if name in run.metrics and run.metrics[name].get(metric) is not None]
            if not points:
                continue
            xs = sorted({x for x, _ in points})
            means = [float(np.mean([v for x, v in points if x == value])) for value in xs]
            colour = colours[index % len(colours)]
            halves = [estimate([v for x, v in points if x == value]).ci95 for value in xs]
            if any(half is not None for half in halves):  # several runs (seeds) at a value: their 95% interval
                axis.errorbar(xs, means, yerr=[half or 0.0 for half in halves], fmt='-', capsize=3, color=colour,
                              label=label(name))
            else:
                axis.plot(xs, means, '-', color=colour, label=label(name))
            axis.scatter(*zip(*points), color=colour, s=12)
    for axis, title in zip(axes, ('ACC: clean test accuracy', 'ASR: triggered test images → target')):
        axis.set(title=title, xlabel=AXES[axis_name], ylabel='%', ylim=(-2, 102))
        axis.legend(fontsize=8)
    what = 'the clean-data fraction' if axis_name == 'ratio' else 'the trigger size'
    save(plt, figure, out / f'acc_asr_vs_{axis_name}{suffix}.png',
         f'ACC and ASR against {what} ({key[0]} → {key[1]}, {key[2]}; {len(members)} runs)', written)


# ---------------------------------------------------------------------------------------------------

def make_figures(plt, runs: list[Run], out: Path, x: str) -> list[Path]:
    written: list[Path] = []
    for run in runs:
        if run.mi is not None:
            plot_mi(plt, run, out, written)
        else:
            print(f'note: {run.path}: no mimic/mi.json yet, no MI figure')
        if run.curves:
            plot_probe(plt, run, out, written)
        elif run.metrics:
            print(f'note: {run.path}: no per-epoch probe values (eval_<name>/log.csv, written by a probe run '
                  'with --results_dir), no probe figure')
        if run.mimic_curve:
            plot_mimic_curve(plt, run, out, written)
        if run.metrics:
            plot_defences(plt, run, out, written)
        else:
            print(f'note: {run.path}: no eval_*/metrics.json yet, no ACC/ASR figures')
    groups = same_setting_but_seed([run for run in runs if run.metrics])
    for members, tag in zip(groups, group_tags(groups)):
        plot_seed_means(plt, members, tag, out, written)
    triggers: dict[Path, tuple] = {}
    for run in runs:
        try:
            path, trigger = run_trigger(run)
        except PlotError as error:
            print(f'note: {error}; no trigger figure for it')
            continue
        triggers.setdefault(path.resolve(), (path, trigger, []))[2].append(run)
    stems = [path.stem for path, _, _ in triggers.values()]
    for index, (path, trigger, users) in enumerate(triggers.values(), start=1):
        name = f'trigger_{path.stem}' + (f'_{index}' if stems.count(path.stem) > 1 else '')
        plot_trigger(plt, path, trigger, users, out / f'{name}.png', written)
    found = sweeps([run for run in runs if run.metrics], x)
    for key, axis, members in found:
        several = sum(axis == other for _, other, _ in found) > 1
        plot_sweep(plt, key, axis, members, out, '_' + '_'.join(key) if several else '', written)
    if not found and x != 'auto':
        raise PlotError(f'--x {x}: no setting (pre-training set, downstream set, attack) has evaluated runs that '
                        f'differ in {x}')
    if not found and len(runs) > 1:
        print('note: no setting has evaluated runs that differ in ratio or trigger size: no ACC/ASR sweep figure')
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dirs', nargs='+', type=Path, metavar='RUN_DIR',
                        help='pipeline run directories (or folders of them)')
    parser.add_argument('--out', type=Path, required=True, metavar='DIR', help='folder to write the PNGs into')
    parser.add_argument('--x', choices=('auto', *AXES), default='auto',
                        help='axis of the sweep figure: ratio, trigger_size, or auto (default): the one in which '
                             'the runs differ')
    parser.add_argument('--dpi', type=int, default=120, help='resolution of the PNGs (default: 120)')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        paths = run_dirs(args.run_dirs)
        runs = [read_run(path, tag) for path, tag in zip(paths, unique_tags(paths))]
        plt = pyplot()
        plt.rcParams['savefig.dpi'] = args.dpi
        written = make_figures(plt, runs, args.out, args.x)
    except MatplotlibMissing:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return 2
    except RunError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if not written:
        print(f"error: nothing to plot in {', '.join(str(p) for p in args.run_dirs)}", file=sys.stderr)
        return 2
    return 0

if __name__ == '__main__':
    sys.exit(main())
