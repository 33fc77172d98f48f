"""The paper's experiments as data over the pipeline's plan (scripts/pipeline.py), from one command.

    python -m scripts.reproduce_paper [--experiments LIST] [--scale paper|demo|proportioned] [--seeds LIST] [--dry_run]
                                      [RUNS_DIR]
    bash scripts/reproduce_paper.sh ...       # the same, from any folder

The flags, the experiments, the scales and the folders they fill: `--help`, from `get_args_parser()`. Here:

* `scale_config(scale, runs, environ)` -> `Scale`: the sizes, lengths and extra flags of a scale (with the
  DEVICE, DATA_ROOT and EXTRA environment variables applied);
* `experiments(scale, dry_run)` -> {name: `Experiment`}: every pipeline run of every experiment, each a
  `pipeline.Setting` (with the trigger file to make first, or the base run's evaluations to copy), and the
  runs each experiment's table collects;
* `steps(scale, wanted, dry_run, seeds)` yields, in order, what to do: the data, references and clean encoder
  (each made once; with seeds, a clean encoder per seed), then each wanted experiment's runs (with seeds, each
  run once per seed, in <run>/seed_<seed>/, from that seed's clean encoder and shared backdoor) and its table
  over them all. It is a generator because some steps depend on what earlier ones made (a file already there is
  not made again);
* `main(argv)` runs them, or prints every command with --dry_run.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from scripts.pipeline import (Command, Note, PipelineError, PipelineParser, Setting, execute, python_run, report, run,
                              seed_run_dir, split_seeds)

PROG = 'reproduce_paper.sh'
EXPERIMENTS = ('main', 'ratio', 'trigger_size', 'ablation', 'mi_model', 'triggers', 'budget')
PAPER_TRIGGER = 'trigger/trigger_pt_white_21_10_ap_replace.npz'
PROPORTIONED_IMAGES = 10000  # the proportioned scale's pre-training set: D = 4% of it is 400 images, 6 batches of 64
PROPORTIONED_CLEAN_EPOCHS = 60  # where the clean encoder's kNN accuracy stops rising (docs/PROPORTIONED.md)
RATIOS = ('0.01', '0.02', '0.04', '0.06', '0.08', '0.10')  # MIMIC's clean-data fractions
ABLATIONS = {'uniform': '--layer_weights uniform', 'no_attention': '--no_attention', 'no_clone': '--no_clone',
             'no_contrastive': '--no_contrastive'}  # run name: MIMIC.py flags
BUDGET_FACTOR = 2.5  # experiment budget: MIMIC and ft with 2.5x the scale's defence epochs (proportioned: 10% of P)
MI_MODEL = ('student', 'MI on the initial student', '--mi_model student')  # run name, label, MIMIC.py flags
TRIGGER_SIZES = {'white_5': '--size 5 --row 26 --col 26', 'white_10': '--size 10 --row 21 --col 21',
                 'white_15': '--size 15 --row 16 --col 16', 'white_20': '--size 20 --row 11 --col 11'}
TRIGGERS = {'white_top_left': '--row 1 --col 1', 'white_top_right': '--row 1 --col 21',
            'white_bottom_left': '--row 21 --col 1', 'white_centre': '--row 11 --col 11',
            'black_21': '--colour black', 'red_21': '--colour 255,0,0'}  # run name: make_trigger.py flags


@dataclass(frozen=True)
class Scale:
    """A scale's settings; the *_args are extra flags of each stage, as one string."""
    name: str  # paper or demo (whose synthetic data sets are made first)
    runs: str
    device: str
    data_root: str
    pretraining: str
    reference_dir: str
    tasks: tuple  # (downstream set, reference name, target class) per target task; the first is the base
    width: str
    clean_epochs: str
    badencoder_epochs: str
    drupe_epochs: str
    ctrl_epochs: str
    mimic_epochs: str
    mi_epochs: str
    nn_epochs: str
    ratio: str
    mimic_lr: str
    clean_args: str
    badencoder_args: str
    drupe_args: str
    ctrl_args: str
    mimic_args: str
    eval_args: str
    defence_args: str
    batch_for_ratio: str  # MIMIC's batch at the smallest ratios
    augment: str
    seed: str = ''  # the seed of every stage of its runs, each in <run>/seed_<seed>/; '' : the stages' default
    attacks: tuple = ('badencoder', 'drupe', 'ctrl')  # main's attacks
    shared_clean: bool = False  # one clean encoder (the stages' default seed) for every seed
    clean_save_freq: str = '50'
    save_freq: str = '50'  # the other stages' (--save_freq of the pipeline)
    experiments: str = ','.join(EXPERIMENTS)  # what --experiments defaults to at this scale
    data: tuple = ()  # (set, sizes, seed) made by datasets.prepare first; sizes '' : the set's own
    mimic_curve: str = '0'  # 1: main's runs also probe each MIMIC checkpoint (pipeline --mimic_curve)

    def seeded(self, run_dir: str) -> str:
        """A run folder of this scale: `run_dir` itself, or with a seed its seed_<seed>/ sub-folder."""
        return seed_run_dir(run_dir, self.seed) if self.seed else run_dir

    @property
    def clean_encoder(self) -> str:
        folder = f'{self.runs}/clean' if self.shared_clean else self.seeded(f'{self.runs}/clean')
        return f'{folder}/model_{self.clean_epochs}.pth'

    @property
    def base(self) -> str:
        """The first task's BadEncoder run: main's first row, whose backdoor ratio, ablation and mi_model use."""
        return self.seeded(f'{self.runs}/main/{self.pretraining}_{self.tasks[0][0]}_badencoder')

    @property
    def base_backdoor(self) -> str:
        return f'{self.base}/backdoor/model_{self.badencoder_epochs}.pth'


def scale_config(scale: str, runs: str = '', environ: Mapping[str, str] = os.environ) -> Scale:
    """The settings of --scale paper (the paper's, for a GPU machine) or demo (scripts/demo.sh's, on a CPU)."""
    device, data_root = environ.get('DEVICE', ''), environ.get('DATA_ROOT', '')
    if scale == 'paper':
        runs = runs or 'runs/paper'
        config = Scale(
            name=scale, runs=runs, device=device or 'auto', data_root=data_root or 'data', pretraining='cifar10',
            reference_dir='reference/cifar10',
            tasks=(('gtsrb', 'priority', '12'), ('svhn', 'one', '1'), ('stl10', 'truck', '9')),
            width='64', clean_epochs='1000', badencoder_epochs='200', drupe_epochs='120', ctrl_epochs='800',
            mimic_epochs='1000', mi_epochs='200', nn_epochs='1000', ratio='0.04', mimic_lr='0.01',
            clean_args='', badencoder_args='', drupe_args='', mimic_args='', eval_args='', defence_args='',
            ctrl_args='--optimizer sgd --lr 0.06 --momentum 0.9 --weight_decay 5e-4 --schedule cosine '
                      '--warmup_epochs 10 --batch_size 512 --no_normalize',  # CTRL's SimCLR recipe (its code's)
            batch_for_ratio='', augment='auto')
    elif scale == 'demo':
        runs = runs or 'runs/paper_demo'
        config = Scale(
            name=scale, runs=runs, device=device or 'cpu', data_root=data_root or f'{runs}/data',
            pretraining='synthetic_shapes', reference_dir=f'{runs}/reference',
            tasks=(('synthetic_digits', 'one', '1'),),
            width='8', clean_epochs='20', badencoder_epochs='5', drupe_epochs='15', ctrl_epochs='20',
            mimic_epochs='120', mi_epochs='20', nn_epochs='400', ratio='0.25', mimic_lr='0.01',
            clean_args='--batch_size 256', badencoder_args='--batch_size 128 --lr 0.01',
            drupe_args='--batch_size 128 --shadow_fraction 1.0 --drupe_adapt_after 5 --drupe_select_after 8',
            ctrl_args='--batch_size 256', mimic_args='--batch_size 128', eval_args='--lr 0.001 --no_progress',
            defence_args='--batch_size 128 --anp_iterations 2000',
            batch_for_ratio='--batch_size 32',  # 1% of 4000 images is 40: one batch needs fewer than 128
            augment='tensor',
            data=(('synthetic_shapes', 'train=4000,test=1000', '1'), ('synthetic_digits', 'train=2000,test=1000', '2')))
    elif scale == 'proportioned':
        # The paper's proportions on a CPU (docs/PROPORTIONED.md): pre-training P = N images x E epochs; D = 4% of
        # the N images, in batches of 64; MIMIC and every baseline E epochs over D, 4% of P's image-passes (the
        # paper: 1000 x 2000 against 1000 x 50,000); the backdoor E/5 epochs on the whole pre-training set as
        # shadow set (BadEncoder's 200 against 1000); ANP's mask steps and DECREE's inversion capped at about 6.4%
        # and 5.1% of P, so that no defence passes 10%. One clean encoder serves every seed.
        runs = runs or 'runs/paper_proportioned'
        images, epochs = PROPORTIONED_IMAGES, PROPORTIONED_CLEAN_EPOCHS
        config = Scale(
            name=scale, runs=runs, device=device or 'cpu', data_root=data_root or f'{runs}/data',
            pretraining='synthetic_shapes', reference_dir=f'{runs}/reference',
            tasks=(('synthetic_digits', 'one', '1'), ('sklearn_digits', 'sklearn_one', '1')),
            width='8', clean_epochs=str(epochs), badencoder_epochs=str(epochs // 5), drupe_epochs='', ctrl_epochs='',
            mimic_epochs=str(epochs), mi_epochs='20', nn_epochs='400', ratio='0.04', mimic_lr='0.01',
            clean_args='--batch_size 256', badencoder_args='--batch_size 128 --lr 0.01', drupe_args='', ctrl_args='',
            mimic_args='--batch_size 64', eval_args='--lr 0.001 --no_progress',
            defence_args=f'--batch_size 64 --anp_iterations {images * epochs // 1000} '
                         f'--invert_steps {images * epochs // 1250}',
            batch_for_ratio='--batch_size 32', augment='tensor', attacks=('badencoder',), shared_clean=True,
            clean_save_freq='10', save_freq='10', mimic_curve='1', experiments='main',  # MIMIC's ASR over epochs
            data=((('synthetic_shapes', f'train={images},test=1000', '1'),
                   ('synthetic_digits', 'train=2000,test=1000', '2'), ('sklearn_digits', '', '0'))))
    else:
        raise PipelineError(f"--scale: expected paper, demo or proportioned, got '{scale}'")
    extra = environ.get('EXTRA', '')
    if extra:  # extra flags for every stage
        config = dataclasses.replace(config, **{
            name: f'{getattr(config, name)} {extra}' for name in
            ('clean_args', 'badencoder_args', 'drupe_args', 'ctrl_args', 'mimic_args', 'eval_args', 'defence_args')})
    return config


@dataclass(frozen=True)
class Variant:
    """One pipeline run of an experiment: its setting; the trigger file to make before it (name, flags of
    trigger/make_trigger.py); whether the base run's probes of the same two encoders are copied in first."""
    setting: Setting
    trigger: tuple = ()
    reuse_evals: bool = False


@dataclass(frozen=True)
class Experiment:
    variants: tuple
    table_runs: tuple  # the run folders its table collects, in order
    table: str  # the table's path without .md / .csv


def experiments(c: Scale, dry_run: bool) -> dict:
    """{experiment: Experiment}, every run of every experiment at scale `c` (pure)."""
    runs, pre = c.runs, c.pretraining
    first_task, first_reference, _ = c.tasks[0]

    def setting(run_dir: str, label: str, **flags) -> Setting:  # a pipeline run at this scale (and seed)
        return Setting(**{'run_dir': c.seeded(run_dir), 'label': label, 'dry_run': '1' if dry_run else '0',
                          'seed': c.seed or Setting.seed, 'save_freq': c.save_freq,
                          'device': c.device, 'data_root': c.data_root, 'pretraining_dataset': pre,
                          'width': c.width, 'clean_epochs': c.clean_epochs, 'mimic_epochs': c.mimic_epochs,
                          'mi_epochs': c.mi_epochs, 'nn_epochs': c.nn_epochs, 'ratio': c.ratio,
                          'mimic_lr': c.mimic_lr, 'clean_encoder': c.clean_encoder, 'augment': c.augment,
                          'eval_args': c.eval_args, 'defence_args': c.defence_args, **flags})

    def badencoder(run_dir: str, label: str, downstream: str, reference: str, trigger: str = PAPER_TRIGGER,
                   **flags) -> Setting:
        return setting(run_dir, label, attack='badencoder', downstream_dataset=downstream,
                       reference_file=f'{c.reference_dir}/{reference}.npz', trigger_file=trigger,
                       badencoder_epochs=c.badencoder_epochs, **flags)

    def on_base_backdoor(run_dir: str, label: str, mimic_flags: str, **flags) -> Variant:  # the shared backdoor
        return Variant(badencoder(run_dir, label, first_task, first_reference, backdoored_encoder=c.base_backdoor,
                                  mimic_args=f'{c.mimic_args} {mimic_flags}', **flags), reuse_evals=True)

    def with_triggers(experiment: str, triggers: dict) -> Experiment:  # a backdoor per trigger, then MIMIC
        variants = tuple(Variant(badencoder(f'{runs}/{experiment}/{name}', name, first_task, first_reference,
                                            trigger=f'{runs}/trigger_files/{name}.npz',
                                            badencoder_args=c.badencoder_args, mimic_args=c.mimic_args),
                                 trigger=(name, flags)) for name, flags in triggers.items())
        return Experiment(variants, tuple(v.setting.run_dir for v in variants), f'{runs}/{experiment}/table')

    main_runs = []
    for downstream, reference, _ in c.tasks:  # the first: c.base
        main_runs.append(badencoder(f'{runs}/main/{pre}_{downstream}_badencoder', '', downstream, reference,
                                    badencoder_args=c.badencoder_args, mimic_args=c.mimic_args, defences='all',
                                    mimic_curve=c.mimic_curve))
        if 'drupe' in c.attacks:
            main_runs.append(setting(f'{runs}/main/{pre}_{downstream}_drupe', '', attack='drupe',
                                     downstream_dataset=downstream,
                                     reference_file=f'{c.reference_dir}/{reference}_3.npz',
                                     trigger_file=PAPER_TRIGGER, badencoder_epochs=c.drupe_epochs,
                                     badencoder_args=c.drupe_args, mimic_args=c.mimic_args, defences='all'))
    main = [Variant(s) for s in main_runs]
    if 'ctrl' in c.attacks:
        ctrl = setting(f'{runs}/main/{pre}_{pre}_ctrl', '', attack='ctrl', target_class='0', poison_rate='0.01',
                       trigger_file=f'{runs}/trigger_files/ctrl.npz', badencoder_epochs=c.ctrl_epochs,
                       badencoder_args=c.ctrl_args, mimic_args=c.mimic_args, defences='all')
        main.append(Variant(ctrl, trigger=('ctrl', '--kind ctrl')))

    ratio = tuple(on_base_backdoor(f'{runs}/ratio/ratio_{r}', f'ratio {r}', c.batch_for_ratio, ratio=r)
                  for r in RATIOS)
    ablation = tuple(on_base_backdoor(f'{runs}/ablation/{name}', name, flags) for name, flags in ABLATIONS.items())
    mi_name, mi_label, mi_flags = MI_MODEL
    mi_model = (on_base_backdoor(f'{runs}/mi_model/{mi_name}', mi_label, mi_flags),)
    longer = str(int(int(c.mimic_epochs) * BUDGET_FACTOR))
    budget = (on_base_backdoor(f'{runs}/budget/epochs_{longer}', f'MIMIC and ft, {longer} epochs', '',
                               mimic_epochs=longer, defences='ft', mimic_curve=c.mimic_curve),)
    return {
        'main': Experiment(tuple(main), tuple(v.setting.run_dir for v in main), f'{runs}/main/table'),
        'ratio': Experiment(ratio, tuple(v.setting.run_dir for v in ratio), f'{runs}/ratio/table'),
        'ablation': Experiment(ablation, (c.base,) + tuple(v.setting.run_dir for v in ablation),
                               f'{runs}/ablation/table'),
        'mi_model': Experiment(mi_model, (c.base, mi_model[0].setting.run_dir), f'{runs}/mi_model/table'),
        'budget': Experiment(budget, (c.base, budget[0].setting.run_dir), f'{runs}/budget/table'),
        'trigger_size': with_triggers('trigger_size', TRIGGER_SIZES),
        'triggers': with_triggers('triggers', TRIGGERS),
    }


def base_run(c: Scale, dry_run: bool) -> Setting:
    """The first task's BadEncoder run without defences: the shared backdoored encoder alone."""
    main = experiments(c, dry_run)['main'].variants[0].setting
    return dataclasses.replace(main, defences='')


@dataclass(frozen=True)
class PipelineRun:
    setting: Setting


@dataclass(frozen=True)
class CopyEvals:
    """The base run's probes of the clean and the shared backdoored encoder, copied into a run that evaluates
    the same two encoder files with the same trigger, reference and probe, so that its pipeline skips them
    (it still re-evaluates a copy whose encoder file or probe length differs). Real runs only."""
    source: str
    target: str


def dirname(path: str) -> str:
    return os.path.dirname(path) or '.'


# baseline_defence.py's defaults that set how many images a defence passes (tests/scripts/test_pipeline.py checks them)
DEFENCE_DEFAULTS = {'--batch_size': 128, '--anp_iterations': 2000, '--invert_steps': 2000}
PRETRAINING_IMAGES = {'cifar10': 50000}  # the real pre-training sets' train split, at --scale paper


def flag_value(args: str, flag: str, default: int) -> int:
    """The integer value of `flag` in a string of flags (its last occurrence), `default` when absent."""
    words, value = args.split(), default
    for index, word in enumerate(words[:-1]):
        if word == flag:
            value = int(words[index + 1])
    return value


def budgets(c: Scale) -> dict:
    """Images x epochs (image-passes: one image through the trained or inverted network, forward and backward)
    of each training stage at scale `c`, for the first task's BadEncoder run:

        pre-training  P = N · E0                      N: the pre-training set, E0: --clean_epochs
        backdoor      N_shadow · E1                   the shadow set is the whole pre-training set (≤ 50,000)
        MIMIC, ft, fp, kd   D · E2                    D = ⌊ratio · N⌋, E2: --mimic_epochs (fp's pruning passes,
                                                      forward only, are not counted)
        nad           D · (E2 + ⌊E2 / 2⌋)             its teacher's fine-tuning first
        anp           iterations · batch              mask steps, batches drawn with replacement
        invert, sslcleanse  steps · batch + D · E2    DECREE's inversion (at most --invert_steps), then training
        clp           0                               data-free

    Returns {'clean data': D, 'pre-training set': N, stage: image-passes}."""
    if c.data:
        from datasets.prepare import parse_sizes  # numpy and PIL: only where a table is made
        images = parse_sizes(next(sizes for name, sizes, _ in c.data if name == c.pretraining))['train']
    else:
        images = PRETRAINING_IMAGES[c.pretraining]
    clean = int(float(c.ratio) * images)
    epochs = int(c.mimic_epochs)
    batch = flag_value(c.defence_args, '--batch_size', DEFENCE_DEFAULTS['--batch_size'])
    inversion = flag_value(c.defence_args, '--invert_steps', DEFENCE_DEFAULTS['--invert_steps']) * batch
    trained = clean * epochs
    return {'pre-training set': images, 'clean data': clean,
            'pre-training': images * int(c.clean_epochs), 'backdoor': min(images, 50000) * int(c.badencoder_epochs),
            'mimic': trained, 'ft': trained, 'fp': trained, 'nad': clean * (epochs + epochs // 2), 'clp': 0,
            'anp': flag_value(c.defence_args, '--anp_iterations', DEFENCE_DEFAULTS['--anp_iterations']) * batch,
            'kd': trained, 'invert': inversion + trained, 'sslcleanse': inversion + trained}


def proportions_table(rows: Iterable[tuple]) -> str:
    """A Markdown table of `budgets` per (label, Scale): each stage's image-passes and its share of the
    pre-training's, and D's share of the pre-training set."""
    lines = ['| setting | pre-training (images × epochs) | D ÷ pre-training set | backdoor | MIMIC | ft, fp, kd | '
             'nad | anp | invert, sslcleanse |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for label, scale in rows:
        b = budgets(scale)
        pre = b['pre-training']

        def share(stage: str) -> str:
            return f"{b[stage]:,} ({100 * b[stage] / pre:.1f}%)"
        images, clean = b['pre-training set'], b['clean data']
        lines.append(f"| {label} | {images:,} × {scale.clean_epochs} = {pre:,} | "
                     f"{clean:,} ÷ {images:,} = {100 * clean / images:.0f}% | "
                     f"{share('backdoor')} | {share('mimic')} | {share('ft')} | {share('nad')} | {share('anp')} | "
                     f"{share('invert')} |")
    return '\n'.join(lines) + '\n'


def standard_proportions() -> str:
    """The table of docs/PROPORTIONED.md: the paper, the demo, the seeded baseline comparison (docs/RESULTS.md §4),
    the proportioned scale."""
    demo = scale_config('demo', environ={})
    return proportions_table([
        ('paper (`--scale paper`)', scale_config('paper', environ={})),
        ('demo (`scripts/demo.sh`, `--scale demo`)', demo),
        ('seeded baseline comparison (BadEncoder 10, defences 80)',
         dataclasses.replace(demo, badencoder_epochs='10', mimic_epochs='80')),
        ('proportioned (`--scale proportioned`)', scale_config('proportioned', environ={}))])


def has_matplotlib() -> bool:
    return subprocess.run([python_run(), '-c', 'import matplotlib'], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def steps(c: Scale, wanted: str, dry_run: bool, seeds: tuple = ()) -> Iterator:
    """What reproducing the `wanted` experiments does, in order (a generator: files are looked at as it goes).
    With `seeds`, every run once per seed (its scale's `seed`), and each experiment's table over all of them."""
    scales = [dataclasses.replace(c, seed=seed) for seed in seeds] or [c]
    planned = set()  # the files made once: listed once by a dry run too

    def wants(name: str) -> bool:
        return f',{name},' in f',{wanted},'

    def made(path: str, *argv: str) -> Iterator:  # a file made once
        if not os.path.isfile(path) and path not in planned:
            planned.add(path)
            yield Command(tuple(argv), creates=path)

    def table(runs: tuple, path: str) -> Iterator:  # the experiment's table, and its figures with matplotlib
        yield Command(('scripts/results_table.py', *runs, '--out', path))
        if dry_run or has_matplotlib():
            yield Command(('scripts/plot_results.py', *runs, '--out', f'{dirname(path)}/figures'))
        else:
            yield Note(f'note: no figures for {dirname(path)} (pip install -r requirements-plot.txt, '
                       'then run scripts/plot_results.py)')

    def one_variant(variant: Variant, scale: Scale) -> Iterator:
        if variant.trigger:
            name, flags = variant.trigger
            yield from made(f'{c.runs}/trigger_files/{name}.npz', 'trigger/make_trigger.py', *flags.split(),
                            '--out', f'{c.runs}/trigger_files/{name}.npz')
        if variant.reuse_evals and not dry_run:
            yield CopyEvals(scale.base, variant.setting.run_dir)
        yield PipelineRun(variant.setting)

    def experiment(name: str) -> Iterator:  # each run over every seed in turn, then its table over them all
        for index in range(len(plans[0][1][name].variants)):
            for scale, plan in plans:
                yield from one_variant(plan[name].variants[index], scale)
        yield from table(tuple(run for _, plan in plans for run in plan[name].table_runs), plans[0][1][name].table)

    # data, references, the clean encoder (once; with seeds, once per seed unless the scale shares one)
    for dataset, sizes, seed in c.data:  # the offline sets of the CPU scales
        yield from made(f'{c.data_root}/{dataset}/test.npz', '-m', 'datasets.prepare', dataset, '--out', c.data_root,
                        *(('--sizes', sizes) if sizes else ()), '--seed', seed)
    for downstream, name, label in c.tasks:
        for count in (1, 3) if 'drupe' in c.attacks else (1,):  # BadEncoder's single reference; DRUPE's three
            path = f"{c.reference_dir}/{name}{'' if count == 1 else f'_{count}'}.npz"
            yield from made(path, 'reference/make_reference.py', '--dataset', downstream, '--data_root', c.data_root,
                            '--class_id', label, '--first', str(count), '--out', path)
    for scale in scales:
        if not os.path.isfile(scale.clean_encoder) and scale.clean_encoder not in planned:
            planned.add(scale.clean_encoder)
            folder = dirname(scale.clean_encoder)
            resume = ('--resume',) if glob.glob(f'{glob.escape(folder)}/model_*.pth') else ()
            seed = ('--seed', scale.seed) if scale.seed and not scale.shared_clean else ()
            yield Command(('-u', 'train_clean_encoder.py', '--pretraining_dataset', c.pretraining, '--width', c.width,
                           '--epochs', c.clean_epochs, '--save_freq', c.clean_save_freq, '--results_dir', folder,
                           '--device', c.device, '--data_root', c.data_root, '--augment', c.augment, *seed,
                           *c.clean_args.split(), *resume))

    plans = [(scale, experiments(scale, dry_run)) for scale in scales]
    if wants('main'):
        yield from experiment('main')
    if wants('ratio') or wants('ablation') or wants('mi_model') or wants('budget'):
        for scale in scales:
            if not (os.path.isfile(scale.base_backdoor) and not dry_run):
                yield PipelineRun(base_run(scale, dry_run))  # the shared backdoored encoder (done stages skipped)
    for name in ('ratio', 'ablation', 'mi_model', 'trigger_size', 'triggers', 'budget'):
        if wants(name):
            yield from experiment(name)
    if not dry_run:
        tables = sorted(glob.glob(f'{glob.escape(c.runs)}/*/table.md'))
        yield Note('tables: ' + ''.join(f'{path} ' for path in tables), when='run')


def probe_lines(log: str, name: str) -> list:
    """The lines of a probe group's log (RUN/eval.log) that belong to its probe `name`: each epoch's loss line
    (`... \tEncoder: <name>`) and metric lines (`..., "encoder": "<name>"}`)."""
    if not os.path.isfile(log):
        return []
    endings = (f'\tEncoder: {name}', f'"encoder": {json.dumps(name)}}}')
    with open(log, errors='replace') as handle:
        return [line for line in handle if line.rstrip('\n').endswith(endings)]


def copy_evals(step: CopyEvals) -> None:
    for name in ('clean', 'backdoored'):
        source, target = f'{step.source}/eval_{name}', f'{step.target}/eval_{name}'
        if not os.path.isfile(f'{source}/metrics.json') or os.path.lexists(target):
            continue
        os.makedirs(step.target, exist_ok=True)
        shutil.copytree(source, target, copy_function=shutil.copy)
        lines = probe_lines(f'{step.source}/eval.log', f'eval_{name}')
        if lines:  # its per-epoch values, for plot_results.py
            with open(f'{step.target}/eval.log', 'a') as log:
                log.writelines(line if line.endswith('\n') else line + '\n' for line in lines)
        elif os.path.isfile(f'{source}.log'):  # a base run evaluated one encoder at a time
            shutil.copy(f'{source}.log', step.target)
        print(f'== eval_{name}: the same encoder, trigger and probe as {step.source}; its result copied', flush=True)


DESCRIPTION = """\
The paper's experiments, each as one table (Markdown and CSV), from one command.

RUNS_DIR (default runs/paper, runs/paper_demo or runs/paper_proportioned) holds clean/ (the clean encoder, trained
once for everything), trigger_files/ (the generated trigger files) and one folder per experiment with one
pipeline run per variant (scripts/run_pipeline.sh), the experiment's table.md / table.csv (+ table_defences.csv)
and, when matplotlib is installed (requirements-plot.txt), its figures/ (scripts/plot_results.py). Shared stages
are trained once: each backdoored encoder of main is reused by ratio, ablation and mi_model. Running the script
again skips what is finished and resumes what was interrupted."""

EPILOG = """\
experiments:
  main          CIFAR10 pre-training; GTSRB "priority road" (12), SVHN "one" (1), STL10 "truck" (9); attacks
                BadEncoder and DRUPE on each target task, and CTRL (data poisoning: CIFAR10's own classes,
                target 0); MIMIC and the eight baseline defences on every backdoored encoder
  ratio         MIMIC at clean-data fractions 0.01, 0.02, 0.04, 0.06, 0.08, 0.10 (the first task's BadEncoder)
  trigger_size  BadEncoder with white square patches of 5, 10, 15, 20 pixels at the bottom right, then MIMIC
  ablation      MIMIC without MI guidance (uniform weights), without attention, clone or contrastive loss
  mi_model      MI measured on the teacher (the paper, our default) against the initial student (the
                released code's choice)
  triggers      BadEncoder and MIMIC with the paper's 10x10 patch at other positions and in other colours
  budget        MIMIC and ft with 2.5x the scale's defence epochs on the first task's backdoor (at
                --scale proportioned: 10% of the pre-training's image-passes instead of 4%): is MIMIC's
                result limited by its budget?

scales:
  paper         the paper's settings: ResNet18, SimCLR 1000 epochs, BadEncoder 200, DRUPE 120,
                CTRL's SimCLR recipe (SGD lr 0.06, cosine, 800 epochs), MIMIC 1000 with ratio 0.04 and
                lr 1e-2, MI 200, probe 1000; on a GPU machine (days for the whole list). Its data, once:
                python -m datasets.prepare cifar10 stl10 gtsrb svhn --download
  demo          the same list on the offline synthetic sets at the demo's scale (scripts/demo.sh), on a CPU
  proportioned  the paper's proportions on a CPU (docs/PROPORTIONED.md): a clean encoder pre-trained on
                10,000 synthetic shapes until its kNN accuracy stops rising, shared by every seed; D = 4% of
                them; MIMIC and the eight baselines each 4% of the pre-training's image-passes (ANP's masks
                6.4%, DECREE's inversion 5.1% + 4%); BadEncoder a fifth of the pre-training's epochs; targets:
                the synthetic digits and scikit-learn's real digits (pip install -r requirements-digits.txt).
                Its default --experiments is main (BadEncoder only, every defence)

environment: EXTRA adds flags to every stage (EXTRA="--amp"); DEVICE and DATA_ROOT replace the scale's
device and data folder."""


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of scripts/reproduce_paper.sh with their help (its --help); usage errors are PipelineErrors."""
    parser = PipelineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument('--experiments', default='', metavar='LIST',
                        help=f"comma-separated, of {', '.join(EXPERIMENTS)}, or all (default: the scale's: all; "
                             'proportioned: main)')
    parser.add_argument('--scale', default='paper', metavar='paper|demo|proportioned',
                        help='the settings of every run, below (default: paper)')
    parser.add_argument('--seeds', metavar='LIST',
                        help='comma-separated seeds (e.g. 0,1,2): every run once per seed, in <run '
                             'folder>/seed_<seed>/, every stage with --seed <seed>: a clean encoder per seed '
                             "(RUNS_DIR/clean/seed_<seed>/; proportioned: one for all) and each seed's own shared "
                             'backdoor; each table pools the seeds of a run (mean ± 95%% interval, the baselines '
                             "against MIMIC on the same seeds; scripts/results_table.py). Without it: one run each, "
                             "the stages' default seed")
    parser.add_argument('--dry_run', action='store_true',
                        help='print every command in order and run nothing (needs no data, creates nothing)')
    parser.add_argument('runs_dir', nargs='?', default='', metavar='RUNS_DIR',
                        help='the folder of every run (default: runs/paper, runs/paper_demo or '
                             'runs/paper_proportioned, by --scale)')
    return parser


def parse_args(argv: Iterable[str]) -> tuple:
    """(experiments, scale, dry_run, runs_dir, seeds) from the command line ('' experiments: the scale's default);
    PipelineError when it is wrong. -h / --help print the help and exit."""
    args, unknown = get_args_parser().parse_known_args(list(argv))
    if unknown:  # an option argparse does not know, or a second RUNS_DIR
        word = unknown[0]
        raise PipelineError(f'unknown option {word} (see --help)' if word.startswith('-') else
                            f"one RUNS_DIR only, got '{args.runs_dir}' and '{word}'")
    seeds = tuple(split_seeds(args.seeds)) if args.seeds is not None else ()
    wanted = ','.join(EXPERIMENTS) if args.experiments == 'all' else args.experiments
    for name in wanted.replace(',', ' ').split():
        if name not in EXPERIMENTS:
            raise PipelineError(f"--experiments: unknown experiment '{name}' (expected main, ratio, trigger_size, "
                                'ablation, mi_model, triggers, budget)')
    return wanted, args.scale, args.dry_run, args.runs_dir, seeds


def main(argv: Iterable[str] | None = None) -> int:
    try:
        wanted, scale, dry_run, runs, seeds = parse_args(sys.argv[1:] if argv is None else argv)
        config = scale_config(scale, runs)
        wanted = wanted or config.experiments
    except PipelineError as error:
        return report(error, PROG)
    try:
        for step in steps(config, wanted, dry_run, seeds):
            if isinstance(step, PipelineRun):
                execute(step.setting)
            elif isinstance(step, CopyEvals):
                copy_evals(step)
            else:
                run([step], dry_run=dry_run)
    except PipelineError as error:  # from a pipeline run or a command: as the pipeline reports it
        return report(error)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
