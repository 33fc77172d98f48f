"""Reading a pipeline run folder: what `scripts/run_pipeline.sh` writes (RUN below), or a folder of the summaries
of a run kept in the repository (docs/results/...: its run.json, metrics.json and defence.json files in their
places, no checkpoint).

    RUN/run.json                        the setting: data sets, attack, seed, label, epochs, ...
    RUN/eval_<name>/metrics.json        the probe of an encoder (clean, backdoored, mimic, a baseline defence):
                                        acc, asr, asr_excluding_target (%)
    RUN/eval_<name>/log.csv             that probe's values after every epoch
    RUN/eval.log, RUN/eval_<name>.log   runs of earlier versions, whose per-epoch values are only in the stage-3
                                        log's JSON lines (eval.log: one line per probe of the group, naming it)
    RUN/mimic/stage_seconds.txt,        the wall time the pipeline measured for MIMIC and for each baseline
    RUN/defence_<name>/stage_seconds.txt  (left out when the stage's args.json says it resumed: that time
                                        counts only what remained after a stop)
    RUN/mimic/mi.json                   MIMIC's MI estimate per tapped layer and the layer weights it gave
    RUN/mimic/log.csv                   MIMIC's training losses per epoch
    RUN/mimic_curve/mimic_<epoch>/metrics.json   the probe of each MIMIC checkpoint (run_pipeline.sh --mimic_curve)
    RUN/<stage>/args.json               a stage's flags and, under 'environment', the code, start time, CPU,
                                        threads and torch version it ran with (common.runs.run_environment)

A file that is there but malformed is a RunError, one line naming it; a file that is not there is left out.
"""
from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from defences import BASELINES  # the baselines' one list, in the pipeline's order; imports no torch

ENCODERS = ('clean', 'backdoored', 'mimic')
ENCODER_ORDER = ENCODERS + BASELINES  # the order in which a run's evaluated encoders are listed
METRICS = (('acc', 'ACC'), ('asr', 'ASR'), ('asr_excluding_target', 'ASR*'))  # metrics.json key, its name


class RunError(ValueError):
    """A run folder, or a file in it, that cannot be read; one line for the user."""


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a RunError naming the file."""
    try:
        with open(path) as handle:
            value = json.load(handle)
    except FileNotFoundError:
        raise RunError(f'{path}: no such file') from None
    except json.JSONDecodeError as error:
        raise RunError(f'{path}: not valid JSON ({error})') from None
    if not isinstance(value, dict):
        raise RunError(f'{path}: expected a JSON object, found {type(value).__name__}')
    return value


def number(value, path: Path, key: str) -> float | None:
    """A number read from a JSON file (None stays None), or a RunError naming the file and key."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f'{path}: {key} must be a number, found {value!r}')
    return float(value)


def read_metrics(path: Path) -> dict:
    """A probe's metrics.json, its ACC, ASR and ASR* checked to be numbers (or null)."""
    metrics = read_json(path)
    for key, _ in METRICS:
        number(metrics.get(key), path, key)
    return metrics


@dataclass
class Run:
    path: Path
    name: str  # the run's name in file names and figure titles: its folder's name unless the reader was given one
    setting: dict  # run.json
    metrics: dict[str, dict] = field(default_factory=dict)  # encoder -> eval_<encoder>/metrics.json, ENCODER_ORDER
    seconds: dict[str, float | None] = field(default_factory=dict)  # mimic or a baseline -> its stage's wall time
    mi: dict | None = None  # mimic/mi.json
    mimic_curve: dict[int, dict] = field(default_factory=dict)  # MIMIC epoch -> its checkpoint's metrics.json
    mimic_log: dict[str, dict[int, float]] = field(default_factory=dict)  # mimic/log.csv: column -> {epoch: value}

    @property
    def pretraining(self) -> str:
        return self.setting.get('pretraining_dataset', '?')

    @property
    def downstream(self) -> str:
        return self.setting.get('downstream_dataset', '?')

    @property
    def attack(self) -> str:
        return self.setting.get('attack', 'badencoder')

    @property
    def label(self) -> str:
        """run_pipeline.sh --label: which variant of an experiment ('' for none)."""
        return self.setting.get('label') or ''

    @property
    def seed(self):
        """run.json's seed, None for a run made without one."""
        return self.setting.get('seed')

    @functools.cached_property
    def curves(self) -> dict[str, dict[str, dict[int, float]]]:
        """read_curves of the run, read on first use (the tables need none of it)."""
        return read_curves(self.path)

    @functools.cached_property
    def environments(self) -> dict[str, dict]:
        """read_environments of the run, read on first use (only the provenance table needs it)."""
        return read_environments(self.path)


def evaluated(path: Path) -> list[str]:
    """The names of the run's eval_<name> folders: those of ENCODER_ORDER in its order, then the others sorted."""
    names = [name for name in ENCODER_ORDER if (path / f'eval_{name}').is_dir()]
    return names + sorted(p.name[len('eval_'):] for p in path.glob('eval_*')
                          if p.is_dir() and p.name[len('eval_'):] not in names)


def read_run(path: Path, name: str | None = None) -> Run:
    """Everything a run folder holds but the per-epoch probe values and the stages' environments (Run.curves,
    Run.environments: read when asked for)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f'{path}: no such run directory')
    run = Run(path, name or path.name, read_json(path / 'run.json'))
    for encoder in evaluated(path):
        if (path / f'eval_{encoder}' / 'metrics.json').is_file():
            run.metrics[encoder] = read_metrics(path / f'eval_{encoder}' / 'metrics.json')
    run.seconds = {encoder: stage_seconds(path / ('mimic' if encoder == 'mimic' else f'defence_{encoder}'))
                   for encoder in run.metrics if encoder not in ('clean', 'backdoored')}
    mi_path = path / 'mimic' / 'mi.json'
    if mi_path.is_file():
        run.mi = check_mi_report(read_json(mi_path), mi_path)
    run.mimic_curve = read_mimic_curve(path, run)
    if (path / 'mimic' / 'log.csv').is_file():
        run.mimic_log = read_csv_columns(path / 'mimic' / 'log.csv')
    return run


def read_environments(path: Path) -> dict[str, dict]:
    """{stage folder: the 'environment' its args.json recorded}, for each args.json one level below the run folder
    (its stages and probes), sorted by folder; one recording none (an earlier version) is left out."""
    found = {}
    for args_path in sorted(path.glob('*/args.json')):
        environment = read_json(args_path).get('environment')
        if isinstance(environment, dict):
            found[args_path.parent.name] = environment
    return found


def stage_seconds(folder: Path) -> float | None:
    """The wall time the pipeline measured for a stage (its stage_seconds.txt), or None: also when the run that
    finished the stage resumed it (its args.json has "resume": true), since the pipeline records the time of that
    run only, which leaves out whatever ran before the stop."""
    args_path = folder / 'args.json'
    if args_path.is_file() and read_json(args_path).get('resume') is True:
        return None
    try:
        return float((folder / 'stage_seconds.txt').read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def check_mi_report(report: dict, path: Path) -> dict:
    """mi.json as MIMIC.py writes it: 'weights' and 'opt' (one per layer), 'mi' {layer: MI} or null."""
    weights, opt = report.get('weights'), report.get('opt')
    if not isinstance(weights, list) or not isinstance(opt, list) or len(weights) != len(opt) or not weights:
        raise RunError(f"{path}: expected 'weights' and 'opt', lists of one value per tapped layer")
    for key in ('weights', 'opt'):
        for value in report[key]:
            number(value, path, key)
    mi = report.get('mi')
    if mi is not None and (not isinstance(mi, dict) or len(mi) != len(weights)):
        raise RunError(f"{path}: 'mi' must map each of the {len(weights)} tapped layers to its estimate, or be null")
    for layer, value in (mi or {}).items():
        number(value, path, f'mi {layer}')
    history = report.get('history')
    if history is not None and not (isinstance(history, dict)
                                    and all(isinstance(values, list) for values in history.values())):
        raise RunError(f"{path}: 'history' must map each layer to its per-epoch estimates, or be null")
    return report


def read_mimic_curve(path: Path, run: Run) -> dict[int, dict]:
    """{MIMIC epoch: the metrics of its checkpoint's probe}: RUN/mimic_curve/mimic_<epoch>/metrics.json, and the
    final encoder's (run.json's mimic_epochs) from RUN/eval_mimic; {} without a mimic_curve folder."""
    curve = {}
    for folder in (path / 'mimic_curve').glob('mimic_*'):
        epoch = folder.name[len('mimic_'):]
        if epoch.isdigit() and (folder / 'metrics.json').is_file():
            curve[int(epoch)] = read_metrics(folder / 'metrics.json')
    final = run.setting.get('mimic_epochs')
    if curve and 'mimic' in run.metrics and isinstance(final, int):
        curve[final] = run.metrics['mimic']
    return dict(sorted(curve.items()))


def read_csv_columns(path: Path) -> dict[str, dict[int, float]]:
    """A stage's log.csv as {column: {epoch: value}} (blank and non-numeric cells left out)."""
    columns: dict[str, dict[int, float]] = {}
    with open(path, newline='') as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                try:
                    columns.setdefault(key, {})[int(row['epoch'])] = float(value)
                except (TypeError, ValueError, KeyError):
                    continue
    columns.pop('epoch', None)
    return columns


# --- per-epoch probe values ------------------------------------------------------------------------------------

def read_curves(path: Path) -> dict[str, dict[str, dict[int, float]]]:
    """{encoder: {'acc' | 'asr' | 'asr_excluding_target': {epoch: value}}} of each probe of the run that left
    per-epoch values with ACC or ASR among them: its eval_<name>/log.csv, else (runs of earlier versions) its
    lines in the stage-3 log RUN/eval.log, else its own RUN/eval_<name>.log."""
    found, group_log = {}, None
    for name in evaluated(path):
        log_csv = path / f'eval_{name}' / 'log.csv'
        if log_csv.is_file():
            curves = read_csv_columns(log_csv)
        else:
            if group_log is None:
                group_log = read_probe_logs(path / 'eval.log') if (path / 'eval.log').is_file() else {}
            curves = group_log.get(f'eval_{name}')
            if not curves and (path / f'eval_{name}.log').is_file():  # one encoder evaluated at a time
                curves = read_probe_log(path / f'eval_{name}.log')
        curves = curves or {}
        if curves.get('acc') or curves.get('asr'):
            found[name] = curves
    return found


@functools.lru_cache(maxsize=None)
def log_metric_keys() -> dict[str, str]:
    """The probe's printed metric names -> metrics.json keys (clean encoders print CA / ASR-B, the others BA /
    ASR). Imported here, not at the top: evaluation.metrics imports torch, and only the logs of runs of earlier
    versions need these names."""
    from evaluation.metrics import EXCLUDING_TARGET_NAME, metric_names
    return {**dict(zip(metric_names('clean'), ('acc', 'asr'))), **dict(zip(metric_names(''), ('acc', 'asr'))),
            EXCLUDING_TARGET_NAME: 'asr_excluding_target'}


def read_probe_logs(path: Path) -> dict[str | None, dict[str, dict[int, float]]]:
    """{encoder: {'acc' | 'asr' | 'asr_excluding_target': {epoch: value}}} from the probe's JSON lines in a stage
    log: a group's lines name their encoder (`"encoder": "eval_<name>"`), a single run's name none (key None).

    The pipeline appends to the log: an evaluation that resumed repeats the epochs after its checkpoint (the
    later line wins), one redone from scratch starts again at epoch 1 (only the last evaluation is kept).
    """
    keys = log_metric_keys()
    curves: dict[str | None, dict[str, dict[int, float]]] = {}
    for line in path.read_text(errors='replace').splitlines():
        start = line.find('{"metric"')
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
            metric = str(record['metric']).removeprefix('Eval - ')
            epoch, value = int(record['epoch']), float(record['value'])
            encoder = record.get('encoder')
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a killed run
        key = keys.get(metric)
        if key is None or not (encoder is None or isinstance(encoder, str)):
            continue
        own = curves.setdefault(encoder, {})
        if epoch == 1 and key == 'acc' and own:
            own.clear()
        own.setdefault(key, {})[epoch] = value
    return curves


def read_probe_log(path: Path, encoder: str | None = None) -> dict[str, dict[int, float]]:
    """The curves of one encoder in a stage log (`encoder` None: the lines that name none, a single run's)."""
    return read_probe_logs(path).get(encoder, {})


# --- runs that differ only in their seed ---------------------------------------------------------------------

NOT_THE_SETTING = ('seed', 'defences')  # run.json keys that do not make another setting


def setting_key(setting: dict) -> str:
    """A run.json without its seed and its list of baseline defences, as text: two runs with the same key differ at
    most in their seed and in the baselines that ran beside MIMIC on their backdoor (a baseline missing on a seed
    counts for fewer seeds: its n). A path in it through the run's own seed folder (seed_<seed>, e.g. the
    backdoored encoder each seed of an experiment reuses) counts as the same path for every seed."""
    own = f"seed_{setting.get('seed')}"

    def general(value):
        if isinstance(value, str) and 'seed' in setting:
            return '/'.join('seed_*' if part == own else part for part in value.split('/'))
        return value

    return json.dumps({key: general(value) for key, value in setting.items() if key not in NOT_THE_SETTING},
                      sort_keys=True)


def seed_name(run: Run) -> str:
    """The run's seed as summary.json's per_seed keys spell it."""
    return str(run.seed)


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """The runs in groups of one setting measured with several seeds: runs whose run.json differ only in 'seed',
    one run per seed, in the order given. A run without a seed in its run.json, or whose seed its setting's group
    already holds, is kept apart (a group of its own, which later seeds of that setting join)."""
    groups, by_setting = [], {}
    for run in runs:
        key = setting_key(run.setting)
        group = by_setting.get(key)
        if run.seed is None or group is None or any(seed_name(other) == seed_name(run) for other in group):
            group = []
            groups.append(group)
            if run.seed is not None:
                by_setting[key] = group
        group.append(run)
    return groups
