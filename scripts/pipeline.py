"""The pipeline driver: the four stages of one setting, each stage a subprocess with its own folder and log.

    python -m scripts.pipeline --run_dir runs/cifar10_gtsrb --reference_file reference/cifar10/priority.npz ...
    bash scripts/run_pipeline.sh ...          # the same, from any folder (it changes to the repository root)

The flags, their defaults and the folders a run makes: `--help`, from `get_args_parser()`, where they are defined.
Run from the repository root: the stages are the repository's scripts, named by relative paths.

The work is split in two:

* `plan(setting)` is pure: from a `Setting` (one field per flag) it returns the steps of the run in order,
  each a `Note` (a line printed), a `WriteJson` (run.json), a `Stage` (a training script with its results
  folder, the file that says it is finished, the checkpoints that say it was interrupted, and its log), a
  `ProbeGroup` (stage 3 for every encoder of the setting, one downstream probe each, in one run) or a
  `Command` (the poisoning of CTRL's data, the results table).
* `run(steps, dry_run=False)` carries them out: a stage whose final file exists is skipped; one whose folder
  holds checkpoints is continued with --resume; what it prints goes to the terminal as printed and to
  RUN/<stage>.log as the terminal finally shows it (a progress bar redrawn with \\r keeps its last state);
  the wall time of the run that finishes it is added to <stage folder>/stage_seconds.txt (a run stopped before
  the end adds nothing, so a resumed stage's time counts only what remained, and the tables leave it out). The
  probe group evaluates only the encoders whose RUN/eval_<name>/metrics.json is missing or stale, logs to
  RUN/eval.log and adds its wall time to RUN/eval_seconds.txt. With `dry_run` every stage's command is printed
  and nothing is read, run or written.

With `--seeds 0,1,2` the plan is that of the setting once per seed, each a whole run in RUN/seed_<seed>/ with
--seed <seed> for every stage (its run.json holds the seed), then one table of them all: RUN/table.md (a cell: the
mean ± its 95% interval over the seeds), RUN/table_seeds.csv and RUN/summary.json (scripts/results_table.py).

`main(argv)` parses the flags (errors: one line on stderr, exit status 2), checks the input files, reads the
target label from the reference file and runs the plan. scripts/reproduce_paper.py builds its experiments from
the same `Setting` and runs them through `execute`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from core.files import write_text_atomic
from defences import BASELINES

PROG = 'run_pipeline.sh'  # the name errors are reported under (the wrapper users call)
ALL_DEFENCES = BASELINES  # the baseline defences' one list (defences/__init__.py imports no torch)
ATTACKS = ('badencoder', 'drupe', 'ctrl')
AUGMENTS = ('auto', 'pil', 'tensor')
ATTACK_EPOCHS = {'badencoder': '200', 'drupe': '120'}  # stage 1's default length; ctrl: --clean_epochs
CHECKPOINT_PLACEHOLDER = '<defence.json: checkpoint>'  # a defence's encoder file, known once it has run


class PipelineError(Exception):
    """The run cannot go on: `message` (printed as one line, unless empty) and the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Setting:
    """One pipeline run: a field per flag of scripts/run_pipeline.sh, the values as given on the command line.

    `target_label` is not a flag: the reference file's label (ctrl: --target_class), which `main` reads before
    planning; left empty, the plan shows a placeholder for it (enough for a dry run).
    """
    run_dir: str = ''
    pretraining_dataset: str = 'cifar10'
    downstream_dataset: str = 'gtsrb'
    reference_file: str = ''
    trigger_file: str = 'trigger/trigger_pt_white_21_10_ap_replace.npz'
    attack: str = 'badencoder'
    target_class: str = '0'
    poison_rate: str = '0.01'
    clean_epochs: str = '1000'
    badencoder_epochs: str = ''  # empty: the attack's own (badencoder 200, drupe 120, ctrl --clean_epochs)
    mimic_epochs: str = '1000'
    mi_epochs: str = '200'
    nn_epochs: str = '1000'
    ratio: str = '0.04'
    mimic_lr: str = '0.01'
    arch: str = 'resnet18'
    width: str = '64'
    device: str = 'auto'
    data_root: str = 'data'
    num_workers: str = '2'
    seed: str = '100'
    seeds: str = ''  # comma-separated: one run per seed, RUN/seed_<seed>/ (see plan)
    save_freq: str = '50'
    augment: str = 'auto'
    clean_encoder: str = ''
    backdoored_encoder: str = ''
    label: str = ''
    dry_run: str = '0'  # anything but 0 lists the commands instead of running them
    defences: str = ''
    mimic_curve: str = '0'  # 1: also probe every checkpoint MIMIC saved (each --save_freq epochs), RUN/mimic_curve/
    clean_args: str = ''
    badencoder_args: str = ''
    mimic_args: str = ''
    defence_args: str = ''
    eval_args: str = ''
    target_label: str = ''


@dataclass(frozen=True)
class Note:
    """A line printed: always, only in a dry run (`when='dry_run'`) or only in a real one (`when='run'`)."""
    text: str
    when: str = 'always'


@dataclass(frozen=True)
class WriteJson:
    """A JSON file written (its folder made) in a real run; nothing in a dry run."""
    path: str
    data: dict


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: `python -u *argv [--resume]`, its output also appended to `log`.

    Finished when `folder/final` exists (then skipped); interrupted when `folder` holds a file matching
    `checkpoints` (then continued with --resume).
    """
    name: str
    argv: tuple
    folder: str
    final: str
    checkpoints: str
    log: str

    @property
    def final_path(self) -> str:
        return f'{self.folder}/{self.final}'


@dataclass(frozen=True)
class Probe:
    """One encoder of a probe group: its name (its folder under the group's results_dir) and encoder file.
    `checkpoint_from`: a defence.json whose 'checkpoint' replaces CHECKPOINT_PLACEHOLDER in `encoder`."""
    name: str
    encoder: str
    checkpoint_from: str = ''


@dataclass(frozen=True)
class ProbeGroup:
    """Stage 3 for several encoders in one run: `python -u *argv --encoder E... --names N...`, its output also
    appended to `log`, its wall time added to `seconds`.

    A member is finished when `results_dir/<name>/metrics.json` was made for its encoder file and `nn_epochs`
    (then skipped); one made for another encoder file or probe length is removed. Only the members not
    finished are probed, from scratch (argv holds --overwrite); none left: the step is skipped.
    """
    name: str
    argv: tuple
    members: tuple
    results_dir: str
    nn_epochs: str
    log: str
    seconds: str

    def metrics_path(self, probe: Probe) -> str:
        return f'{self.results_dir}/{probe.name}/metrics.json'

    def command(self, members: Iterable[Probe]) -> tuple:
        members = tuple(members)
        return (*self.argv, '--encoder', *(probe.encoder for probe in members),
                '--names', *(probe.name for probe in members))


@dataclass(frozen=True)
class Command:
    """A plain command, `python *argv`, printed to the terminal only; skipped, silently, when `creates`
    names a file that exists; `note` is printed before it runs."""
    argv: tuple
    creates: str = ''
    note: str = ''


Step = Union[Note, WriteJson, Stage, ProbeGroup, Command]


# --- the command line ---------------------------------------------------------------------------------------

DESCRIPTION = """\
Chain the four stages for one setting, each stage in its own folder under one run directory:

  RUN/clean/       stage 0  train_clean_encoder.py          -> model_<E0>.pth
  RUN/backdoor/    stage 1  train_badencoder.py [--attack drupe] -> model_<E1>.pth
                   (--attack ctrl: RUN/poisoned_data/ = python -m datasets.poison, then stage 0 on it
                    -> model_<E0>.pth; the clean row keeps its own stage 0)
  RUN/mimic/       stage 2  MIMIC.py                        -> model<E2>.pth (+ mi.json)
  RUN/defence_<d>/ stage 2  baseline_defence.py --defence d -> model_<E>.pth, defence.json  (--defences)
  RUN/eval_clean/, RUN/eval_backdoored/, RUN/eval_mimic/, RUN/eval_<d>/
                   stage 3  training_downstream_classifier.py -> metrics.json, one run for all the encoders
                   (--encoder ... --names eval_clean ...: their probes trained together, each as its own run)
  RUN/run.json     the setting;  RUN/<stage>.log  what each stage printed (RUN/eval.log: stage 3's run);
  <stage folder>/stage_seconds.txt  the wall time of the run that finished the stage (a resumed stage: what remained);
  RUN/eval_seconds.txt  stage 3's (summed over its runs)

Run it again and a finished stage is skipped; an interrupted one continues with --resume from its
latest checkpoint; stage 3 probes only the encoders whose metrics.json is missing or was made for another
encoder file or probe length."""

EPILOG = """\
Every option but --dry_run takes the word after it as its value, also one that starts with '-'
(--eval_args --no_progress). Example (the paper's CIFAR10 -> GTSRB setting, on a GPU machine):

  bash scripts/run_pipeline.sh --run_dir runs/cifar10_gtsrb --pretraining_dataset cifar10 \\
      --downstream_dataset gtsrb --reference_file reference/cifar10/priority.npz \\
      --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz"""

# the flags that take a value: a field of Setting each (tests/scripts/test_pipeline.py checks the parser has them all)
VALUE_FLAGS = frozenset(f'--{field.name}' for field in dataclasses.fields(Setting)
                        if field.name not in ('target_label', 'dry_run'))


class PipelineParser(argparse.ArgumentParser):
    """argparse whose usage errors are PipelineErrors: one line under the wrapper's name and status 2, as the
    pipeline's other errors, instead of the usage and the message."""

    def error(self, message: str):
        raise PipelineError(f'{message} (see --help)')


def get_args_parser() -> PipelineParser:
    """The flags of scripts/run_pipeline.sh with their help (its --help). A flag not given is left out of the
    namespace, so that Setting's default applies (the one place the defaults live) and parse_args can tell
    which were given."""
    defaults = Setting()
    parser = PipelineParser(
        prog=PROG, usage='%(prog)s --run_dir DIR [--reference_file FILE] [--OPTION VALUE ...] [--dry_run]',
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, argument_default=argparse.SUPPRESS)

    def add(group, name: str, metavar: str, text: str) -> None:  # its help ends with Setting's default, if any
        default = getattr(defaults, name)
        group.add_argument(f'--{name}', metavar=metavar, help=f'{text} (default: {default})' if default else text)

    run = parser.add_argument_group('the run')
    add(run, 'run_dir', 'DIR', 'the run folder (required)')
    add(run, 'label', 'TEXT', 'a name for the run, kept in run.json and shown by results_table.py')
    run.add_argument('--dry_run', nargs='?', const='1', choices=('0', '1'), metavar='0|1',
                     help="print every stage's command in order and run nothing (no file is read or written); "
                          'an explicit 0 after it runs them after all')
    add(run, 'seed', 'N', 'the seed of every stage')
    add(run, 'seeds', 'LIST',
        'comma-separated seeds (e.g. 0,1,2), instead of --seed: the setting once per seed, each a whole run (the '
        'layout above) in RUN/seed_<seed>/ whose every stage gets --seed <seed> (the clean encoder too, unless '
        '--clean_encoder is given) and whose run.json holds it; then one table of them: RUN/table.md (a cell: mean '
        '± half-width of its 95%% confidence interval over the seeds; each baseline against MIMIC on the same '
        'seeds), RUN/table.csv, RUN/table_seeds.csv (one row per seed), RUN/summary.json (+ RUN/table_defences.csv)')
    add(run, 'device', 'DEVICE', 'the device of every stage')
    add(run, 'data_root', 'DIR', 'the data sets\' folder')
    add(run, 'num_workers', 'N', 'DataLoader worker processes of every stage')
    add(run, 'save_freq', 'N', 'stages 0 and 2 and the defences save a checkpoint every N epochs, for resuming')

    setting = parser.add_argument_group('the setting')
    add(setting, 'pretraining_dataset', 'NAME', 'the pre-training set')
    add(setting, 'downstream_dataset', 'NAME', 'the downstream task (--attack ctrl: the pre-training set itself)')
    add(setting, 'reference_file', 'FILE', "the target's reference inputs, whose first label is the target label "
        '(required but with --attack ctrl; e.g. reference/cifar10/priority.npz)')
    add(setting, 'trigger_file', 'FILE', 'the trigger')
    add(setting, 'attack', 'badencoder|drupe|ctrl', 'the attack of stage 1')
    add(setting, 'target_class', 'N', '--attack ctrl: the poisoned class of the pre-training set; the downstream '
        'task becomes the pre-training set itself, with that class as the target, as CTRL evaluates')
    add(setting, 'poison_rate', 'FRACTION', '--attack ctrl: the share of the pre-training set poisoned')
    add(setting, 'arch', 'NAME', 'the encoder architecture')
    add(setting, 'width', 'N', 'the encoder width')
    add(setting, 'augment', 'auto|pil|tensor',
        "the augmentation path of stages 0-2 and the defences: pil, the original's per-image PIL transforms in "
        'worker processes; tensor, whole batches on the device with the same distributions (about 1.8x faster on a '
        '2-core CPU); auto, tensor on CUDA only')

    lengths = parser.add_argument_group('lengths')
    add(lengths, 'clean_epochs', 'N', 'stage 0')
    add(lengths, 'badencoder_epochs', 'N', "stage 1 (default: the attack's own: "
        + ', '.join(f'{attack} {epochs}' for attack, epochs in ATTACK_EPOCHS.items()) + ', ctrl --clean_epochs)')
    add(lengths, 'mimic_epochs', 'N', 'MIMIC, and every baseline defence that trains')
    add(lengths, 'mi_epochs', 'N', "MIMIC's MI estimation")
    add(lengths, 'nn_epochs', 'N', "stage 3's probe")
    add(lengths, 'ratio', 'FRACTION', 'the clean data of MIMIC and the defences, a fraction of the pre-training set')
    add(lengths, 'mimic_lr', 'LR', "MIMIC's learning rate")

    given = parser.add_argument_group('encoders given instead of trained')
    add(given, 'clean_encoder', 'PATH', 'use this encoder instead of training stage 0')
    add(given, 'backdoored_encoder', 'PATH', 'use this backdoored encoder instead of stage 1 (e.g. one trained by '
        'another run, to compare defences or MIMIC settings on the same backdoor)')

    compared = parser.add_argument_group('what is compared')
    add(compared, 'defences', 'LIST', 'baseline defences run beside MIMIC on the backdoored encoder, '
        f"comma-separated ({','.join(ALL_DEFENCES)} or all; default: none); the ones that train get "
        "--epochs = --mimic_epochs, MIMIC's budget, and MIMIC's --ratio")
    add(compared, 'mimic_curve', '0|1', 'with 1, also probe every checkpoint MIMIC saved (each --save_freq epochs '
        "before the last), each in RUN/mimic_curve/mimic_<epoch>/: MIMIC's ACC and ASR over its epochs")

    extra = parser.add_argument_group('extra flags of a stage, one string each (e.g. --mimic_args "--amp")')
    add(extra, 'clean_args', 'FLAGS', 'stage 0 (also the backdoor of --attack ctrl, which is stage 0 on the '
        'poisoned data)')
    add(extra, 'badencoder_args', 'FLAGS', 'stage 1')
    add(extra, 'mimic_args', 'FLAGS', 'MIMIC')
    add(extra, 'defence_args', 'FLAGS', 'every baseline defence')
    add(extra, 'eval_args', 'FLAGS', 'stage 3')
    return parser


def attach_values(argv: Iterable[str]) -> list:
    """`argv` with each flag that takes a value joined to the word after it (--eval_args --no_progress ->
    --eval_args=--no_progress): that word is its value even when it starts with '-', which argparse would read as
    an option."""
    words, rest = [], list(argv)
    while rest:
        word = rest.pop(0)
        if word in VALUE_FLAGS and rest:
            word = f'{word}={rest.pop(0)}'
        words.append(word)
    return words


def parse_args(argv: Iterable[str]) -> Setting:
    """The setting of a command line of scripts/run_pipeline.sh, every flag not given at Setting's default;
    PipelineError when the line is wrong. -h / --help print the help and exit."""
    args, unknown = get_args_parser().parse_known_args(attach_values(argv))
    if unknown:
        raise PipelineError(f'unknown option {unknown[0]} (see --help)')
    given = vars(args)
    if 'seed' in given and 'seeds' in given:
        raise PipelineError('--seed and --seeds: give one (--seeds runs the setting once per seed)')
    return Setting(**given)


# --- the setting --------------------------------------------------------------------------------------------

def split_defences(text: str) -> list:
    """--defences split at its commas (one trailing comma is ignored, as bash's `read -a` does)."""
    if not text:
        return []
    names = text.split(',')
    if names[-1] == '':
        names.pop()
    return names


def split_seeds(text: str) -> list:
    """--seeds split at its commas: the seeds as decimal text ('007' -> '7'); PipelineError unless each is a
    non-negative integer given once."""
    seeds = []
    for part in text.split(','):
        part = part.strip()
        if not part.isdigit() or not part.isascii():
            raise PipelineError(f"--seeds: expected comma-separated non-negative integers, got '{text}'")
        if str(int(part)) in seeds:
            raise PipelineError(f'--seeds: seed {int(part)} is given twice')
        seeds.append(str(int(part)))
    return seeds


def seed_run_dir(run_dir: str, seed: str) -> str:
    """The run folder of one seed of a --seeds run."""
    return f'{run_dir}/seed_{seed}'


def settle(setting: Setting, exists: Callable[[str], bool] | None = None) -> Setting:
    """The setting checked, with the attack's defaults filled in (stage 1's length, CTRL's downstream task,
    the target label of CTRL) and 'all' defences spelled out. With `exists` (a real run), the input files
    are checked too. Raises PipelineError, with the message of the first thing wrong."""
    s = setting
    if not s.run_dir:
        raise PipelineError('--run_dir is required')
    if s.augment not in AUGMENTS:
        raise PipelineError(f"--augment: expected auto, pil or tensor, got '{s.augment}'")
    if s.attack not in ATTACKS:
        raise PipelineError(f"--attack: expected badencoder, drupe or ctrl, got '{s.attack}'")
    if s.attack == 'ctrl':  # stage 1 is SimCLR on the poisoned pre-training set, evaluated on its own classes
        s = dataclasses.replace(s, badencoder_epochs=s.badencoder_epochs or s.clean_epochs,
                                downstream_dataset=s.pretraining_dataset, target_label=s.target_class)
    else:
        s = dataclasses.replace(s, badencoder_epochs=s.badencoder_epochs or ATTACK_EPOCHS[s.attack])
        if not s.reference_file:
            raise PipelineError('--reference_file is required (e.g. reference/cifar10/priority.npz)')
    if exists is not None:  # a dry run may list the commands of a run whose inputs later steps make
        for flag, path in (('--reference_file', s.reference_file), ('--trigger_file', s.trigger_file),
                           ('--clean_encoder', s.clean_encoder), ('--backdoored_encoder', s.backdoored_encoder)):
            if (path or flag == '--trigger_file') and not exists(path):
                raise PipelineError(f'{flag} {path}: no such file')
    if s.seeds:
        s = dataclasses.replace(s, seeds=','.join(split_seeds(s.seeds)))
    if s.defences == 'all':
        s = dataclasses.replace(s, defences=','.join(ALL_DEFENCES))
    for name in split_defences(s.defences):
        if name not in ALL_DEFENCES:
            raise PipelineError(f"--defences: unknown defence '{name}' (expected some of "
                                f"{','.join(ALL_DEFENCES)}, or all)")
    return s


def read_target_label(reference_file: str) -> str:
    """The target label of a reference file (its first label); PipelineError when the file is not one."""
    from datasets import load_reference  # imported here: it brings torch, which a dry run does not need
    try:
        return str(int(load_reference(reference_file).target_label))
    except (ValueError, OSError) as error:  # DataError is a ValueError
        raise PipelineError(f'--reference_file {error}') from None


_JSON_NUMBER = re.compile(r'-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?')


def json_value(text: str):
    """A numeric flag's value as run.json holds it: the number when the text is a JSON number, else the text."""
    return json.loads(text) if _JSON_NUMBER.fullmatch(text) else text


def run_json(setting: Setting) -> dict:
    """run.json: the setting (settled) as results_table.py and plot_results.py read it."""
    s, number = setting, json_value
    return {'pretraining_dataset': s.pretraining_dataset, 'downstream_dataset': s.downstream_dataset,
            'target_label': number(s.target_label), 'attack': s.attack, 'poison_rate': number(s.poison_rate),
            'reference_file': s.reference_file, 'trigger_file': s.trigger_file, 'arch': s.arch,
            'width': number(s.width), 'clean_epochs': number(s.clean_epochs),
            'badencoder_epochs': number(s.badencoder_epochs), 'mimic_epochs': number(s.mimic_epochs),
            'mi_epochs': number(s.mi_epochs), 'nn_epochs': number(s.nn_epochs), 'ratio': number(s.ratio),
            'mimic_lr': number(s.mimic_lr), 'seed': number(s.seed), 'defences': s.defences, 'label': s.label,
            'backdoored_encoder': s.backdoored_encoder, 'augment': s.augment}


# --- the plan -----------------------------------------------------------------------------------------------

def plan(setting: Setting) -> list:
    """The steps of one run, in order (pure: reads no file). See the module's docstring and Stage.

    With `seeds`, the steps of the setting's run for each seed (run_dir RUN/seed_<seed>, seed <seed>), then the
    table of those runs: RUN/table.md, .csv, _seeds.csv (+ _defences.csv) and RUN/summary.json over the seeds."""
    s = settle(setting)
    run = s.run_dir
    if s.seeds:
        seeds = split_seeds(s.seeds)
        runs = [seed_run_dir(run, seed) for seed in seeds]
        steps = [Note(f"== seeds {', '.join(seeds)}: one run each, in {seed_run_dir(run, '<seed>')}")]
        for seed, seed_run in zip(seeds, runs):
            steps += plan(dataclasses.replace(s, run_dir=seed_run, seed=seed, seeds=''))
        return steps + [Command(('scripts/results_table.py', *runs, '--out', f'{run}/table',
                                 '--summary', f'{run}/summary.json'))]
    target_label = s.target_label or f'<y[0] of {s.reference_file}>'
    reference_flags = ['--reference_file', s.reference_file] if s.reference_file else []
    common = ['--device', s.device, '--data_root', s.data_root, '--num_workers', s.num_workers, '--seed', s.seed]
    training = common + ['--augment', s.augment]  # stages 0-2 and the defences (stage 3 does not augment)

    def stage(name, folder, final, checkpoints, *argv, **extra):
        return Stage(name, tuple(argv), folder, final, checkpoints, f'{run}/{name}.log', **extra)

    steps = [Note(f'== run {run}' + (f' ({s.label})' if s.label else ''), when='dry_run'),
             WriteJson(f'{run}/run.json', run_json(dataclasses.replace(s, target_label=target_label)))]

    clean_encoder = s.clean_encoder
    if not clean_encoder:
        steps.append(stage(
            'clean', f'{run}/clean', f'model_{s.clean_epochs}.pth', 'model_*.pth',
            'train_clean_encoder.py', '--pretraining_dataset', s.pretraining_dataset, '--arch', s.arch,
            '--width', s.width, '--epochs', s.clean_epochs, '--save_freq', s.save_freq,
            '--results_dir', f'{run}/clean', *training, *s.clean_args.split()))
        clean_encoder = f'{run}/clean/model_{s.clean_epochs}.pth'

    backdoored_encoder = s.backdoored_encoder
    if backdoored_encoder:
        steps.append(Note(f'== backdoor: given, {backdoored_encoder}'))
    elif s.attack == 'ctrl':
        # data poisoning: a poisoned copy of the pre-training split, then plain SimCLR on it (CTRL's recipe)
        poisoned = f'{run}/poisoned_data'
        steps.append(Command(
            ('-m', 'datasets.poison', '--dataset', s.pretraining_dataset, '--data_root', s.data_root,
             '--trigger_file', s.trigger_file, '--target_class', s.target_class, '--poison_rate', s.poison_rate,
             '--seed', s.seed, '--out', poisoned, '--overwrite'),
            creates=f'{poisoned}/poison.json',
            note=f'== poison: {s.poison_rate} of {s.pretraining_dataset}, class {s.target_class}, '
                 f'with {s.trigger_file}'))
        steps.append(stage(
            'backdoor', f'{run}/backdoor', f'model_{s.badencoder_epochs}.pth', 'model_*.pth',
            'train_clean_encoder.py', '--pretraining_dataset', s.pretraining_dataset, '--data_dir', poisoned,
            '--arch', s.arch, '--width', s.width, '--epochs', s.badencoder_epochs, '--save_freq', s.save_freq,
            '--results_dir', f'{run}/backdoor', *training, *s.clean_args.split(), *s.badencoder_args.split()))
    else:
        steps.append(stage(
            'backdoor', f'{run}/backdoor', f'model_{s.badencoder_epochs}.pth', 'model_*.pth',
            'train_badencoder.py', '--attack', s.attack, '--pretraining_dataset', s.pretraining_dataset,
            '--shadow_dataset', s.pretraining_dataset, '--encoder_usage_info', s.pretraining_dataset,
            '--downstreamTask', s.downstream_dataset, '--pretrained_encoder', clean_encoder,
            '--reference_file', s.reference_file, '--trigger_file', s.trigger_file,
            '--epochs', s.badencoder_epochs, '--results_dir', f'{run}/backdoor', *training,
            *s.badencoder_args.split()))
    backdoored_encoder = backdoored_encoder or f'{run}/backdoor/model_{s.badencoder_epochs}.pth'

    steps.append(stage(
        'mimic', f'{run}/mimic', f'model{s.mimic_epochs}.pth', 'model[0-9]*.pth',
        'MIMIC.py', '--pretraining_dataset', s.pretraining_dataset, '--teacher', backdoored_encoder,
        '--ratio', s.ratio, '--lr', s.mimic_lr, '--epochs', s.mimic_epochs, '--mi_epochs', s.mi_epochs,
        '--save_freq', s.save_freq, '--results_dir', f'{run}/mimic', *training, *s.mimic_args.split()))

    # the baseline defences on the same backdoored encoder and clean subset as MIMIC
    encoders = [('clean', clean_encoder, ''), ('backdoored', backdoored_encoder, ''),
                ('mimic', f'{run}/mimic/model{s.mimic_epochs}.pth', '')]
    for name in split_defences(s.defences):
        folder = f'{run}/defence_{name}'
        steps.append(stage(
            f'defence_{name}', folder, 'defence.json', '*_[0-9]*.pth',
            'baseline_defence.py', '--defence', name, '--pretraining_dataset', s.pretraining_dataset,
            '--teacher', backdoored_encoder, '--ratio', s.ratio, '--epochs', s.mimic_epochs,
            '--save_freq', s.save_freq, '--results_dir', folder, *training, *s.defence_args.split()))
        encoders.append((name, f'{folder}/{CHECKPOINT_PLACEHOLDER}', f'{folder}/defence.json'))

    # one probe per encoder, trained together (stage 3's group run), each in RUN/eval_<name> as a single run's;
    # an evaluation is redone from scratch (the cheapest stage, whose encoder may have been retrained) when its
    # metrics.json is missing or was made for another encoder file or probe length
    def probe_command(results_dir: str) -> tuple:  # stage 3 on this run's task, its members in results_dir/<name>
        return ('training_downstream_classifier.py', '--dataset', s.downstream_dataset,
                '--encoder_usage_info', s.pretraining_dataset, '--trigger_file', s.trigger_file, *reference_flags,
                '--reference_label', target_label, '--nn_epochs', s.nn_epochs, '--results_dir', results_dir,
                '--overwrite', *common, *s.eval_args.split())

    steps.append(ProbeGroup(
        'eval', probe_command(run),
        tuple(Probe(f'eval_{name}', encoder, checkpoint_from) for name, encoder, checkpoint_from in encoders),
        run, s.nn_epochs, f'{run}/eval.log', f'{run}/eval_seconds.txt'))

    if s.mimic_curve not in ('', '0'):  # MIMIC's ACC and ASR over its epochs: each checkpoint's own probe
        curve = f'{run}/mimic_curve'
        steps.append(ProbeGroup(
            'mimic_curve', probe_command(curve),
            tuple(Probe(f'mimic_{epoch}', f'{run}/mimic/model{epoch}.pth')
                  for epoch in range(int(s.save_freq), int(s.mimic_epochs), int(s.save_freq))),
            curve, s.nn_epochs, f'{run}/mimic_curve.log', f'{run}/mimic_curve_seconds.txt'))

    steps.append(Command(('scripts/results_table.py', run, '--out', f'{run}/table',
                          '--summary', f'{run}/summary.json')))
    return steps


# --- running it ---------------------------------------------------------------------------------------------

def python_shown() -> str:
    """The interpreter as the commands show it: $PYTHON, else python."""
    return os.environ.get('PYTHON') or 'python'


def python_run() -> str:
    """The interpreter the stages run with: $PYTHON, else this one."""
    return os.environ.get('PYTHON') or sys.executable


def say(text: str) -> None:
    print(text, flush=True)


def fresh_metrics(path: str, encoder: str, nn_epochs: str) -> bool:
    """Whether the metrics.json at `path` was made for this encoder file and probe length."""
    try:
        with open(path) as handle:
            metrics = json.load(handle)
        return metrics.get('encoder') == encoder and int(metrics.get('epoch', -1)) == int(nn_epochs)
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def defence_checkpoint(path: str) -> str:
    """The encoder file a defence wrote, as its defence.json names it."""
    try:
        with open(path) as handle:
            return str(json.load(handle)['checkpoint'])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(f'{path}: no checkpoint named ({error!r})') from None


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def tee_to_log(command: list, log_path: str) -> int:
    """Run `command`, its stdout and stderr to the terminal as printed and to the end of `log_path` as the
    terminal finally shows each line (what precedes a line's last \\r is dropped). Returns its status."""
    os.makedirs(os.path.dirname(log_path) or '.', exist_ok=True)
    terminal = getattr(sys.stdout, 'buffer', None)
    with open(log_path, 'ab') as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pending = b''
        try:
            while True:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                if terminal is not None:
                    terminal.write(chunk)
                    terminal.flush()
                else:
                    sys.stdout.write(chunk.decode(errors='replace'))
                    sys.stdout.flush()
                *lines, pending = (pending + chunk).split(b'\n')
                pending = pending.rpartition(b'\r')[2]  # only a line's last redraw reaches the log
                log.writelines(line.rpartition(b'\r')[2] + b'\n' for line in lines)
                log.flush()
            if pending:
                log.write(pending)
        finally:
            process.stdout.close()
            returncode = process.wait()
    return returncode


def add_seconds(path: str, spent: int) -> None:
    """Add `spent` to the seconds recorded in `path` (a stage's wall time; stage 3's, summed over its runs)."""
    before = 0
    if os.path.isfile(path):
        try:
            with open(path) as handle:
                before = int(handle.read().strip() or 0)
        except ValueError:
            before = 0
    write_text_atomic(path, f'{before + spent}\n')


def run_stage(stage: Stage, python: str) -> None:
    final = stage.final_path
    if os.path.isfile(final):
        say(f'== {stage.name}: done ({final}), skipped')
        return
    interrupted = stage.checkpoints and glob.glob(f'{glob.escape(stage.folder)}/{stage.checkpoints}')
    resume = ['--resume'] if interrupted else []
    say(f"== {stage.name}: {' '.join(stage.argv)} {' '.join(resume)}")
    started = int(time.monotonic())
    returncode = tee_to_log([python, '-u', *stage.argv, *resume], stage.log)
    if returncode != 0:
        raise PipelineError('', exit_status(returncode))  # the stage said why; the log keeps it
    if not os.path.isfile(final):
        raise PipelineError(f'{stage.name} did not produce {final} (see {stage.log})')
    add_seconds(f'{stage.folder}/stage_seconds.txt', int(time.monotonic()) - started)


def stale_probes(group: ProbeGroup) -> list:
    """The members to probe (their defence checkpoints named): those without a metrics.json made for their
    encoder file and probe length; a stale metrics.json is removed. The others are reported done."""
    stale = []
    for probe in group.members:
        if probe.checkpoint_from:
            encoder = probe.encoder.replace(CHECKPOINT_PLACEHOLDER, defence_checkpoint(probe.checkpoint_from))
            probe = Probe(probe.name, encoder)
        final = group.metrics_path(probe)
        if os.path.isfile(final) and not fresh_metrics(final, probe.encoder, group.nn_epochs):
            say(f'== {probe.name}: {final} is for another encoder or probe length, evaluating again')
            os.remove(final)
        if os.path.isfile(final):
            say(f'== {probe.name}: done ({final}), skipped')
        else:
            stale.append(probe)
    return stale


def run_probe_group(group: ProbeGroup, python: str) -> None:
    stale = stale_probes(group)
    if not stale:
        return
    argv = group.command(stale)
    say(f"== {group.name}: {' '.join(argv)}")
    started = int(time.monotonic())
    returncode = tee_to_log([python, '-u', *argv], group.log)
    if returncode != 0:
        raise PipelineError('', exit_status(returncode))  # stage 3 said why; the log keeps it
    for probe in stale:
        if not os.path.isfile(group.metrics_path(probe)):
            raise PipelineError(f'{probe.name} did not produce {group.metrics_path(probe)} (see {group.log})')
    add_seconds(group.seconds, int(time.monotonic()) - started)


def run_command(command: Command, python: str) -> None:
    if command.creates and os.path.isfile(command.creates):
        return
    if command.note:
        say(command.note)
    returncode = subprocess.run([python, *command.argv]).returncode
    if returncode != 0:
        raise PipelineError('', exit_status(returncode))


def run(steps: Iterable[Step], dry_run: bool = False) -> int:
    """Carry out `steps` (a plan) in order, or, with `dry_run`, print every command and do nothing else.

    Returns 0; raises PipelineError when a stage fails (status: the stage's, with an empty message) or does
    not leave its final file (status 2).
    """
    shown, python = python_shown(), python_run()
    for step in steps:
        if isinstance(step, Note):
            if step.when == 'always' or (step.when == 'dry_run') == dry_run:
                say(step.text)
        elif dry_run:
            if isinstance(step, (Stage, Command)):
                say(f"{shown} {' '.join(step.argv)}")
            elif isinstance(step, ProbeGroup):
                say(f"{shown} {' '.join(step.command(step.members))}")
        elif isinstance(step, WriteJson):
            write_text_atomic(step.path, json.dumps(step.data, indent=1) + '\n')
        elif isinstance(step, Stage):
            run_stage(step, python)
        elif isinstance(step, ProbeGroup):
            run_probe_group(step, python)
        elif isinstance(step, Command):
            run_command(step, python)
        else:
            raise TypeError(f'not a pipeline step: {step!r}')
    return 0


def execute(setting: Setting) -> int:
    """One run of a setting as the command line gives it: checked, its target label read, planned, run (or
    listed, when its dry_run is not 0). Raises PipelineError."""
    dry_run = setting.dry_run != '0'
    setting = settle(setting, exists=None if dry_run else os.path.isfile)
    if not dry_run and setting.attack != 'ctrl':
        setting = dataclasses.replace(setting, target_label=read_target_label(setting.reference_file))
    return run(plan(setting), dry_run=dry_run)


def report(error: PipelineError, prog: str = PROG) -> int:
    if error.message:
        print(f'{prog}: {error.message}', file=sys.stderr, flush=True)
    return error.status


def main(argv: Iterable[str] | None = None) -> int:
    try:
        return execute(parse_args(sys.argv[1:] if argv is None else argv))
    except PipelineError as error:
        return report(error)
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
