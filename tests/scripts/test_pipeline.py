"""The pipeline driver.

Through the bash wrappers (scripts/run_pipeline.sh, scripts/reproduce_paper.sh) on a tiny setting: all four stages,
skip when finished, resume when interrupted, argument errors, the reproduction's dry run. In-process
(scripts/pipeline.py, scripts/reproduce_paper.py), without training: the plan of hand-made settings, run.json
with a quoted label, skip / resume / logs / stage times with a stand-in stage, stage 3 probing only the encoders
without a fresh metrics.json (a stand-in probe script), the reproduction over finished runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from scripts import pipeline as driver
from scripts import reproduce_paper


def pipeline(run_dir: Path, data_root: Path, reference: Path, trigger: Path, *extra: str,
             eval_progress: bool = False):
    """The pipeline on the tiny setting; progress bars only for the evaluations when `eval_progress`."""
    command = ['bash', 'scripts/run_pipeline.sh', '--run_dir', str(run_dir), '--data_root', str(data_root),
               '--device', 'cpu', '--num_workers', '0', '--pretraining_dataset', 'synthetic_shapes',
               '--downstream_dataset', 'synthetic_digits', '--reference_file', str(reference),
               '--trigger_file', str(trigger), '--width', '8', '--clean_epochs', '2', '--badencoder_epochs', '1',
               '--mimic_epochs', '2', '--mi_epochs', '1', '--nn_epochs', '2', '--ratio', '0.25',
               '--save_freq', '1', '--clean_args', '--batch_size 32 --no_progress',
               '--badencoder_args', '--batch_size 32 --no_progress', '--mimic_args', '--batch_size 32 --no_progress',
               '--eval_args', '' if eval_progress else '--no_progress', *extra]
    env = dict(os.environ, TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    if eval_progress:
        del env['TQDM_DISABLE']
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=600)
    # decoded by hand: text mode would turn the progress bars' \r into \n
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


@pytest.mark.process
def test_pipeline_runs_skips_and_resumes(tmp_path, data_root, reference_file, trigger_file):
    run = tmp_path / 'run'
    first = pipeline(run, data_root, reference_file, trigger_file, eval_progress=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the evaluations drew progress bars (redrawn with \r) on the terminal; their log keeps clean lines
    assert '\r' in first.stdout
    assert sum(line.startswith('== eval: ') for line in first.stdout.splitlines()) == 1  # one run for the three
    log = (run / 'eval.log').read_bytes().decode()  # not read_text: it would turn \r into \n
    assert '\r' not in log
    for name in ('eval_clean', 'eval_backdoored', 'eval_mimic'):
        assert sum(line.startswith('{"metric": ') and line.endswith(f'"encoder": "{name}"}}')
                   for line in log.splitlines()) == 2 * 3  # 2 epochs, 3 metrics
    assert int((run / 'eval_seconds.txt').read_text()) >= 0
    for path in ['clean/model_2.pth', 'backdoor/model_1.pth', 'mimic/model2.pth', 'mimic/mi.json',
                 'eval_clean/metrics.json', 'eval_backdoored/metrics.json', 'eval_mimic/metrics.json',
                 'run.json', 'table.md', 'table.csv', 'summary.json']:
        assert (run / path).is_file(), path
    setting = json.loads((run / 'run.json').read_text())
    assert setting['target_label'] == 1 and setting['downstream_dataset'] == 'synthetic_digits'
    summary = json.loads((run / 'summary.json').read_text())
    assert set(summary) == {'clean', 'backdoored', 'mimic'}
    assert all(0 <= summary[e]['acc'] <= 100 and 0 <= summary[e]['asr'] <= 100 for e in summary)

    # run again after an interruption: the finished stages are skipped and not rewritten, and ...
    mtimes = {path: (run / path).stat().st_mtime_ns for path in ('clean/model_2.pth', 'backdoor/model_1.pth')}
    # ... an interrupted MIMIC stage (only its epoch-1 checkpoint left) resumes, and its evaluation is redone ...
    (run / 'mimic' / 'model2.pth').unlink()
    (run / 'eval_mimic' / 'metrics.json').unlink()
    # ... and a baseline defence asked for now runs beside it on the same backdoored encoder
    resumed = pipeline(run, data_root, reference_file, trigger_file, '--defences', 'ft',
                       '--defence_args', '--batch_size 32 --no_progress')
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for stage in ['clean', 'backdoor', 'eval_clean', 'eval_backdoored']:
        assert f'== {stage}: done' in resumed.stdout
    assert all((run / path).stat().st_mtime_ns == mtime for path, mtime in mtimes.items())
    mimic_line = next(line for line in resumed.stdout.splitlines() if line.startswith('== mimic:'))
    assert '--resume' in mimic_line
    eval_line = next(line for line in resumed.stdout.splitlines() if line.startswith('== eval:'))
    assert eval_line.endswith(' --names eval_mimic eval_ft')  # only the encoders not evaluated yet
    assert (run / 'mimic' / 'model2.pth').is_file() and (run / 'eval_mimic' / 'metrics.json').is_file()
    for path in ['defence_ft/model_2.pth', 'eval_ft/metrics.json', 'table_defences.csv', 'defence_ft/stage_seconds.txt',
                 'mimic/stage_seconds.txt']:
        assert (run / path).is_file(), path
    summary = json.loads((run / 'summary.json').read_text())
    assert set(summary['defences']) == {'mimic', 'ft'}
    assert all(set(row) == {'acc', 'asr', 'asr_excluding_target', 'seconds'} for row in summary['defences'].values())
    assert '| ft |' in (run / 'table.md').read_text()


@pytest.mark.parametrize('args, message', [
    ([], '--run_dir is required'),
    (['--run_dir', 'x', '--reference_file', 'nowhere.npz'], 'nowhere.npz'),
    (['--run_dir', 'x', '--bogus', '1'], 'unknown option --bogus'),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--defences', 'ft,magic'], "unknown defence 'magic'"),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--augment', 'gpu'], "--augment: expected auto, pil or tensor"),
    (['--run_dir', 'x', '--seed', '1', '--seeds', '1,2'], '--seed and --seeds: give one'),
])
@pytest.mark.process
def test_pipeline_bad_arguments(args, message):
    result = subprocess.run(['bash', 'scripts/run_pipeline.sh', *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def dry_run(*args: str) -> subprocess.CompletedProcess:
    """reproduce_paper.sh --dry_run; its commands show $PYTHON (this interpreter, conftest), here as `python`."""
    result = subprocess.run(['bash', 'scripts/reproduce_paper.sh', '--dry_run', *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    result.stdout = '\n'.join(line.replace(f'{sys.executable} ', 'python ', 1) if line.startswith(sys.executable)
                               else line for line in result.stdout.splitlines())
    return result


@pytest.mark.process
def test_reproduce_paper_dry_run_lists_every_experiment_and_creates_nothing(tmp_path):
    runs = tmp_path / 'paper'
    result = dry_run(str(runs))
    assert result.returncode == 0, result.stderr
    assert not runs.exists()
    out = result.stdout
    lines = out.splitlines()
    assert lines.index(next(l for l in lines if 'train_clean_encoder.py' in l)) < lines.index(
        next(l for l in lines if l.startswith('== run')))  # the clean encoder first, once
    assert sum('train_clean_encoder.py' in l and '--data_dir' not in l for l in lines) == 1
    for task in ('gtsrb', 'svhn', 'stl10'):
        for attack in ('badencoder', 'drupe'):
            assert f'== run {runs}/main/cifar10_{task}_{attack}' in out
    assert f'== run {runs}/main/cifar10_cifar10_ctrl' in out and 'datasets.poison' in out
    ctrl_teacher = f'--teacher {runs}/main/cifar10_cifar10_ctrl/backdoor/model_800.pth'
    assert sum(ctrl_teacher in l for l in lines) == 1 + len(driver.ALL_DEFENCES)  # CTRL's encoder: MIMIC and each baseline
    purifiers = [l for l in lines if 'MIMIC.py' in l or 'baseline_defence.py' in l]
    assert purifiers and all(re.search(r'--teacher \S+\.pth', l) for l in purifiers)
    # every defence on every main run, and the budget experiment's ft at 2.5x the epochs
    assert sum('baseline_defence.py' in l for l in lines) == 7 * len(driver.ALL_DEFENCES) + 1
    assert f'{runs}/budget/epochs_2500 (MIMIC and ft, 2500 epochs)' in out
    for ratio in ('0.01', '0.02', '0.04', '0.06', '0.08', '0.10'):
        assert f'{runs}/ratio/ratio_{ratio} (ratio {ratio})' in out
    for size in (5, 10, 15, 20):
        assert f'--size {size}' in out and f'{runs}/trigger_size/white_{size}' in out
    for flag in ('--layer_weights uniform', '--no_attention', '--no_clone', '--no_contrastive', '--mi_model student'):
        assert flag in out, flag
    assert f'{runs}/triggers/red_21' in out
    for experiment in ('main', 'ratio', 'trigger_size', 'ablation', 'mi_model', 'triggers'):
        assert f'--out {runs}/{experiment}/table' in out, experiment


@pytest.mark.process
def test_reproduce_paper_dry_run_of_one_experiment_at_demo_scale(tmp_path):
    result = dry_run('--scale', 'demo', '--experiments', 'ratio', str(tmp_path / 'demo'))
    assert result.returncode == 0, result.stderr
    assert 'datasets.prepare synthetic_shapes' in result.stdout and 'train_badencoder.py' in result.stdout
    assert '/main/' in result.stdout and 'baseline_defence.py' not in result.stdout  # only the shared backdoor
    assert result.stdout.count('--backdoored_encoder') == 0 and result.stdout.count('== backdoor: given') == 6
    lines = result.stdout.splitlines()
    training = [l for l in lines if any(s in l for s in ('train_clean_encoder.py', 'train_badencoder.py', 'MIMIC.py'))]
    assert len(training) == 2 + 7 and all('--augment tensor' in l for l in training)  # the demo's fast path
    assert not any('--augment' in l for l in lines if 'training_downstream_classifier.py' in l)
    assert not (tmp_path / 'demo').exists()


@pytest.mark.process
def test_reproduce_paper_dry_run_with_seeds_runs_everything_once_per_seed(tmp_path):
    runs = tmp_path / 'demo'
    result = dry_run('--scale', 'demo', '--experiments', 'mi_model', '--seeds', '0,1', str(runs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    clean = [l for l in lines if 'train_clean_encoder.py' in l]
    assert [(f'--results_dir {runs}/clean/seed_{s} ' in l, f' --seed {s} ' in l) for s, l in zip((0, 1), clean)] == [
        (True, True)] * 2 and len(clean) == 2
    base = f'{runs}/main/synthetic_shapes_synthetic_digits_badencoder'
    for seed in (0, 1):
        assert f'== run {base}/seed_{seed}' in lines and f'== run {runs}/mi_model/student/seed_{seed} (MI on the ' \
                                                          'initial student)' in lines
        assert f'== backdoor: given, {base}/seed_{seed}/backdoor/model_5.pth' in lines
        assert sum(f'--results_dir {base}/seed_{seed}/' in l and f' --seed {seed} ' in l for l in lines) == 2
    assert lines.count(f'python reference/make_reference.py --dataset synthetic_digits --data_root {runs}/data '
                       f'--class_id 1 --first 1 --out {runs}/reference/one.npz') == 1  # shared by the seeds
    table = next(l for l in lines if l.endswith(f'--out {runs}/mi_model/table'))
    assert table.split()[2:-2] == [f'{base}/seed_0', f'{runs}/mi_model/student/seed_0', f'{base}/seed_1',
                                   f'{runs}/mi_model/student/seed_1']
    assert not runs.exists()


@pytest.mark.parametrize('args, message', [
    (['--experiments', 'main,bogus'], "unknown experiment 'bogus'"),
    (['--scale', 'huge'], "--scale: expected paper, demo or proportioned"),
    (['--frobnicate'], 'unknown option --frobnicate'),
    (['--seeds', '1,x'], "--seeds: expected comma-separated non-negative integers, got '1,x'"),
])
@pytest.mark.process
def test_reproduce_paper_bad_arguments(args, message):
    result = dry_run(*args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count('\n') == 1


# --- scripts/pipeline.py in-process: the plan (pure), run.json, skip / resume / logs without training ---------


def test_plan_of_a_badencoder_setting_is_the_commands_in_order():
    setting = driver.Setting(run_dir='R', reference_file='ref.npz', clean_epochs='3', mimic_epochs='4', mi_epochs='5',
                             nn_epochs='6', width='8', device='cpu', num_workers='0', save_freq='1',
                             clean_args='--batch_size 32', mimic_args=' --a  b ', eval_args='--no_progress')
    steps = driver.plan(setting)
    assert steps == driver.plan(setting)  # pure: the same setting, the same plan
    assert steps[0] == driver.Note('== run R', when='dry_run')
    assert steps[1].path == 'R/run.json' and steps[1].data['badencoder_epochs'] == 200  # BadEncoder's default
    stages = {s.name: s for s in steps if isinstance(s, driver.Stage)}
    assert list(stages) == ['clean', 'backdoor', 'mimic']
    common = ('--device', 'cpu', '--data_root', 'data', '--num_workers', '0', '--seed', '100')
    assert stages['clean'] == driver.Stage(
        'clean', ('train_clean_encoder.py', '--pretraining_dataset', 'cifar10', '--arch', 'resnet18', '--width', '8',
                  '--epochs', '3', '--save_freq', '1', '--results_dir', 'R/clean', *common, '--augment', 'auto',
                  '--batch_size', '32'),
        'R/clean', 'model_3.pth', 'model_*.pth', 'R/clean.log')
    backdoor = stages['backdoor']
    assert backdoor.argv[:2] == ('train_badencoder.py', '--attack') and backdoor.final == 'model_200.pth'
    assert ('--pretrained_encoder', 'R/clean/model_3.pth') == backdoor.argv[11:13]
    mimic = stages['mimic']
    assert mimic.final_path == 'R/mimic/model4.pth' and mimic.checkpoints == 'model[0-9]*.pth'
    assert mimic.argv[-2:] == ('--a', 'b') and ('--teacher', 'R/backdoor/model_200.pth') == mimic.argv[3:5]
    evaluation = steps[-2]  # stage 3: one run for the three encoders, each probe in R/eval_<name>
    assert evaluation == driver.ProbeGroup(
        'eval', ('training_downstream_classifier.py', '--dataset', 'gtsrb', '--encoder_usage_info', 'cifar10',
                 '--trigger_file', 'trigger/trigger_pt_white_21_10_ap_replace.npz', '--reference_file', 'ref.npz',
                 '--reference_label', '<y[0] of ref.npz>', '--nn_epochs', '6', '--results_dir', 'R', '--overwrite',
                 *common, '--no_progress'),
        (driver.Probe('eval_clean', 'R/clean/model_3.pth'), driver.Probe('eval_backdoored', 'R/backdoor/model_200.pth'),
         driver.Probe('eval_mimic', 'R/mimic/model4.pth')),
        'R', '6', 'R/eval.log', 'R/eval_seconds.txt')
    assert evaluation.command(evaluation.members[2:])[-4:] == ('--encoder', 'R/mimic/model4.pth', '--names',
                                                               'eval_mimic')
    assert evaluation.metrics_path(evaluation.members[0]) == 'R/eval_clean/metrics.json'
    assert steps[-1] == driver.Command(('scripts/results_table.py', 'R', '--out', 'R/table',
                                        '--summary', 'R/summary.json'))


def test_plan_of_drupe_ctrl_given_encoders_and_defences():
    drupe = driver.plan(driver.Setting(run_dir='R', reference_file='r3.npz', attack='drupe', defences='all',
                                       target_label='7', label='L'))
    assert drupe[0].text == '== run R (L)'
    names = [s.name for s in drupe if isinstance(s, (driver.Stage, driver.ProbeGroup))]
    assert names == ['clean', 'backdoor', 'mimic'] + [f'defence_{d}' for d in driver.ALL_DEFENCES] + ['eval']
    stages = {s.name: s for s in drupe if isinstance(s, (driver.Stage, driver.ProbeGroup))}
    assert stages['backdoor'].final == 'model_120.pth' and stages['backdoor'].argv[2] == 'drupe'
    assert stages['defence_ft'].final == 'defence.json' and stages['defence_ft'].checkpoints == '*_[0-9]*.pth'
    probes = {probe.name: probe for probe in stages['eval'].members}
    assert list(probes) == ['eval_clean', 'eval_backdoored', 'eval_mimic'] + [f'eval_{d}' for d in driver.ALL_DEFENCES]
    assert probes['eval_ft'] == driver.Probe('eval_ft', 'R/defence_ft/<defence.json: checkpoint>',
                                             'R/defence_ft/defence.json')
    assert ('--reference_label', '7') == stages['eval'].argv[9:11]

    ctrl = driver.plan(driver.Setting(run_dir='R', attack='ctrl', target_class='3', poison_rate='0.05',
                                      clean_epochs='9', pretraining_dataset='stl10'))
    poison = next(s for s in ctrl if isinstance(s, driver.Command))
    assert poison.argv[:2] == ('-m', 'datasets.poison') and poison.creates == 'R/poisoned_data/poison.json'
    stages = {s.name: s for s in ctrl if isinstance(s, (driver.Stage, driver.ProbeGroup))}
    assert stages['backdoor'].argv[:5] == ('train_clean_encoder.py', '--pretraining_dataset', 'stl10',
                                           '--data_dir', 'R/poisoned_data')
    assert stages['backdoor'].final == 'model_9.pth'  # CTRL's stage 1 is as long as stage 0 by default
    evaluation = stages['eval'].argv
    assert evaluation[2] == 'stl10' and '--reference_file' not in evaluation
    assert evaluation[evaluation.index('--reference_label') + 1] == '3'
    assert ctrl[1].data['downstream_dataset'] == 'stl10' and ctrl[1].data['target_label'] == 3

    given = driver.plan(driver.Setting(run_dir='R', reference_file='r.npz', clean_encoder='c.pth',
                                       backdoored_encoder='b.pth'))
    assert [s.name for s in given if isinstance(s, (driver.Stage, driver.ProbeGroup))] == ['mimic', 'eval']
    assert driver.Note('== backdoor: given, b.pth') in given
    assert [probe.encoder for probe in given[-2].members] == ['c.pth', 'b.pth', 'R/mimic/model1000.pth']


def test_plan_with_seeds_is_a_run_per_seed_then_their_table():
    setting = driver.Setting(run_dir='R', reference_file='ref.npz', clean_epochs='3', defences='clp', seeds='2, 07')
    steps = driver.plan(setting)
    per_seed = [driver.plan(dataclasses.replace(setting, run_dir=f'R/seed_{seed}', seed=seed, seeds=''))
                for seed in ('2', '7')]
    assert steps == [driver.Note('== seeds 2, 7: one run each, in R/seed_<seed>'), *per_seed[0], *per_seed[1],
                     driver.Command(('scripts/results_table.py', 'R/seed_2', 'R/seed_7', '--out', 'R/table',
                                     '--summary', 'R/summary.json'))]
    assert [(s.path, s.data['seed']) for s in steps if isinstance(s, driver.WriteJson)] == [
        ('R/seed_2/run.json', 2), ('R/seed_7/run.json', 7)]
    assert 'seeds' not in steps[2].data  # the runs' run.json differ only in their seed
    trained = [s for s in steps if isinstance(s, (driver.Stage, driver.ProbeGroup))]
    assert len(trained) == 2 * 5 and all(  # clean, backdoor, mimic, defence_clp, eval: each with its run's seed
        step.argv[step.argv.index('--seed') + 1] == step.log.split('/')[1].removeprefix('seed_') for step in trained)
    assert trained[5].argv[trained[5].argv.index('--results_dir') + 1] == 'R/seed_7/clean'
    given = driver.plan(dataclasses.replace(setting, clean_encoder='c.pth', seeds='0,1'))
    backdoors = [s for s in given if isinstance(s, driver.Stage) and s.name == 'backdoor']
    assert [s.argv[s.argv.index('--pretrained_encoder') + 1] for s in backdoors] == ['c.pth', 'c.pth']
    assert [s.argv[s.argv.index('--seed') + 1] for s in backdoors] == ['0', '1']
    assert not any(isinstance(s, driver.Stage) and s.name == 'clean' for s in given)


def test_plan_checks_the_setting_purely(tmp_path):
    for setting, message in [(driver.Setting(), '--run_dir is required'),
                             (driver.Setting(run_dir='R'), '--reference_file is required'),
                             (driver.Setting(run_dir='R', attack='x'), "--attack: expected badencoder, drupe or ctrl"),
                             (driver.Setting(run_dir='R', attack='ctrl', defences='ft,,'), "unknown defence ''")]:
        with pytest.raises(driver.PipelineError, match=message):
            driver.plan(setting)
    driver.plan(driver.Setting(run_dir=str(tmp_path / 'R'), reference_file=str(tmp_path / 'nowhere.npz')))
    assert list(tmp_path.iterdir()) == []  # planning reads and writes nothing


def test_dry_run_in_process_prints_the_plan(capsys, monkeypatch):
    monkeypatch.delenv('PYTHON', raising=False)
    assert driver.main(['--run_dir', 'R', '--reference_file', 'nowhere.npz', '--dry_run', '1',
                        '--defences', 'clp', '--label', 'x y']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '== run R (x y)' and len(lines) == 1 + 4 + 1 + 1  # stage 3: one run for four encoders
    assert lines[1].startswith('python train_clean_encoder.py ') and lines[-1].startswith('python scripts/results')
    assert lines[-2].startswith('python training_downstream_classifier.py ') and lines[-2].endswith(
        ' --encoder R/clean/model_1000.pth R/backdoor/model_200.pth R/mimic/model1000.pth '
        'R/defence_clp/<defence.json: checkpoint> --names eval_clean eval_backdoored eval_mimic eval_clp')
    monkeypatch.setenv('PYTHON', '/opt/py')
    assert driver.main(['--run_dir', 'R', '--reference_file', 'r.npz', '--dry_run', '1']) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith('/opt/py train_clean_encoder.py ')


@pytest.mark.parametrize('argv, message', [
    (['--run_dir'], 'argument --run_dir: expected one argument'),
    (['--run_dir', 'x', '--nope', '1'], 'unknown option --nope'),
    (['--run_dir', 'x', 'stray'], 'unknown option stray'),
    (['--run_dir', 'x', '--dry_run', 'yes'], "argument --dry_run: invalid choice: 'yes'"),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--trigger_file', 'nowhere.npz'],
     '--trigger_file nowhere.npz: no such file'),
    (['--run_dir', 'x', '--reference_file', 'README.md'], '--reference_file README.md: not a readable .npz'),
    (['--run_dir', 'x', '--seeds', '0,1', '--seed', '3'], '--seed and --seeds: give one'),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--seeds', '0,a'],
     "--seeds: expected comma-separated non-negative integers, got '0,a'"),
    (['--run_dir', 'x', '--reference_file', 'README.md', '--seeds', '1,2,01'], '--seeds: seed 1 is given twice'),
])
def test_main_errors_are_one_line_and_status_2(argv, message, capsys):
    assert driver.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'run_pipeline.sh: {message}') and err.count('\n') == 1


def test_the_parser_has_one_flag_per_setting_field():
    fields = {f'--{field.name}' for field in dataclasses.fields(driver.Setting)} - {'--target_label'}
    options = set(re.findall(r'^  (?:-h, )?(--\w+)', driver.get_args_parser().format_help(), flags=re.M))
    assert options == fields | {'--help'}
    assert driver.VALUE_FLAGS == fields - {'--dry_run'}
    for flag in driver.VALUE_FLAGS:  # the word after a flag is its value, also one that starts with '-'
        assert getattr(driver.parse_args([flag, '--no_progress']), flag[2:]) == '--no_progress', flag
    assert driver.parse_args([]) == driver.Setting()  # a flag not given: Setting's default


@pytest.mark.parametrize('argv, dry_run', [
    ([], '0'), (['--dry_run'], '1'), (['--dry_run', '0'], '0'), (['--dry_run', '1'], '1'),
    (['--dry_run', '--label', 'x'], '1'), (['--label', '--dry_run'], '0'),
])
def test_dry_run_is_a_switch_that_still_reads_an_explicit_0_or_1(argv, dry_run):
    assert driver.parse_args(['--run_dir', 'R', *argv]).dry_run == dry_run


def test_reproduce_paper_reads_its_options_anywhere_on_the_line():
    assert reproduce_paper.parse_args([]) == ('', 'paper', False, '', ())
    assert reproduce_paper.parse_args(['R', '--dry_run', '--experiments', 'all', '--seeds', '2,01']) == (
        ','.join(reproduce_paper.EXPERIMENTS), 'paper', True, 'R', ('2', '1'))
    with pytest.raises(driver.PipelineError, match="one RUNS_DIR only, got 'a' and 'b'"):
        reproduce_paper.parse_args(['a', '--scale', 'demo', 'b'])
    with pytest.raises(driver.PipelineError, match='argument --scale: expected one argument'):
        reproduce_paper.parse_args(['--scale'])


@pytest.mark.process
def test_the_wrappers_help_is_their_parsers(monkeypatch):
    monkeypatch.setenv('COLUMNS', '100')  # argparse wraps the help to the terminal's width
    for wrapper, module in (('run_pipeline.sh', driver), ('reproduce_paper.sh', reproduce_paper)):
        result = subprocess.run(['bash', f'scripts/{wrapper}', '--help'], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and result.stdout == module.get_args_parser().format_help(), wrapper


def finished_run(run: Path, reference: Path, trigger: Path, label: str) -> list:
    """A tiny setting's flags, and every stage's final file made by hand (as if the stages had run)."""
    flags = ['--run_dir', str(run), '--reference_file', str(reference), '--trigger_file', str(trigger),
             '--clean_epochs', '2', '--badencoder_epochs', '1', '--mimic_epochs', '2', '--nn_epochs', '3',
             '--defences', 'clp', '--label', label]
    for path in ['clean/model_2.pth', 'backdoor/model_1.pth', 'mimic/model2.pth', 'defence_clp/model_0.pth']:
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_bytes(b'')
    (run / 'defence_clp' / 'defence.json').write_text(json.dumps({'checkpoint': 'model_0.pth'}))
    for name, encoder in [('clean', 'clean/model_2.pth'), ('backdoored', 'backdoor/model_1.pth'),
                          ('mimic', 'mimic/model2.pth'), ('clp', 'defence_clp/model_0.pth')]:
        (run / f'eval_{name}').mkdir()
        (run / f'eval_{name}' / 'metrics.json').write_text(json.dumps(
            {'acc': 50.0, 'asr': 10.0, 'asr_excluding_target': 9.0, 'epoch': 3, 'encoder': f'{run}/{encoder}'}))
    return flags


def test_finished_run_is_skipped_and_run_json_holds_a_quoted_label(tmp_path, reference_file, trigger_file, capfd):
    run = tmp_path / 'run'
    label = 'a "quoted" label \\ with a backslash'
    flags = finished_run(run, reference_file, trigger_file, label)
    assert driver.main(flags) == 0
    out = capfd.readouterr().out
    for stage in ['clean', 'backdoor', 'mimic', 'defence_clp', 'eval_clean', 'eval_backdoored', 'eval_mimic',
                  'eval_clp']:
        assert f'== {stage}: done (' in out, stage
    setting = json.loads((run / 'run.json').read_text())
    assert setting['label'] == label and setting['target_label'] == 1 and setting['defences'] == 'clp'
    assert setting['ratio'] == 0.04 and setting['badencoder_epochs'] == 1 and setting['width'] == 64
    assert json.loads((run / 'summary.json').read_text())['mimic']['acc'] == 50.0
    assert label in (run / 'table.md').read_text()
    assert not list(run.glob('*.log')) and not list(run.glob('*/stage_seconds.txt'))  # nothing ran

    assert not (run / 'eval_seconds.txt').exists()


def test_finished_runs_of_several_seeds_are_skipped_and_pooled(tmp_path, reference_file, trigger_file, capfd):
    root = tmp_path / 'run'
    for seed in (0, 1):
        flags = finished_run(root / f'seed_{seed}', reference_file, trigger_file, 'x')
        path = root / f'seed_{seed}' / 'eval_mimic' / 'metrics.json'
        path.write_text(json.dumps({**json.loads(path.read_text()), 'asr': 10.0 + 4 * seed}))
    flags[flags.index('--run_dir') + 1] = str(root)
    assert driver.main(flags + ['--seeds', '0,1']) == 0
    out = capfd.readouterr().out
    assert out.count('== mimic: done (') == 2 and 'train_' not in out
    assert [json.loads((root / f'seed_{seed}' / 'run.json').read_text())['seed'] for seed in (0, 1)] == [0, 1]
    summary = json.loads((root / 'summary.json').read_text())
    assert (summary['mimic']['asr'], summary['mimic']['n'], summary['mimic']['asr_ci95']) == (
        12.0, 2, pytest.approx(12.706204736174707 * 2))  # values 10 and 14: s = 2√2, half-width t_{0.975,1}·s/√2
    assert set(summary['mimic']['per_seed']) == {'0', '1'} and summary['defences']['clp']['n'] == 2
    assert json.loads((root / 'seed_1' / 'summary.json').read_text())['mimic']['asr'] == 14.0  # each seed's own
    assert len((root / 'table_seeds.csv').read_text().splitlines()) == 1 + 2
    assert '| x | 2 | 50.00 ± 0.00 |' in (root / 'table.md').read_text()


STAND_IN_PROBES = """import json, os, sys
argv = sys.argv[1:]
encoders = argv[argv.index('--encoder') + 1:argv.index('--names')]
results_dir, epochs = argv[argv.index('--results_dir') + 1], int(argv[argv.index('--nn_epochs') + 1])
for name, encoder in zip(argv[argv.index('--names') + 1:], encoders):
    print(json.dumps({'metric': 'Eval - Backdoored Accuracy (BA)', 'value': 60.0, 'epoch': 1, 'encoder': name}))
    os.makedirs(f'{results_dir}/{name}', exist_ok=True)
    with open(f'{results_dir}/{name}/metrics.json', 'w') as out:
        json.dump({'acc': 60.0, 'asr': 5.0, 'asr_excluding_target': 4.0, 'epoch': epochs, 'encoder': encoder,
                   'argv': argv}, out)
"""


def test_rerun_evaluates_only_the_encoders_without_fresh_metrics(tmp_path, reference_file, trigger_file, capfd,
                                                                 monkeypatch):
    """Stage 3 replaced by a stand-in ($PYTHON runs it for training_downstream_classifier.py) that writes each
    named probe's metrics.json and records its arguments."""
    run = tmp_path / 'run'
    flags = finished_run(run, reference_file, trigger_file, 'x')
    stand_in, python = tmp_path / 'stand_in.py', tmp_path / 'python'
    stand_in.write_text(STAND_IN_PROBES)
    python.write_text(f'#!/bin/sh\nif [ "$2" = training_downstream_classifier.py ]; then shift 2; '
                      f'exec "{sys.executable}" "{stand_in}" "$@"; fi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv('PYTHON', str(python))

    # one metrics.json deleted: that encoder alone is probed, from scratch; the others are kept as they were
    (run / 'eval_mimic' / 'metrics.json').unlink()
    assert driver.main(flags) == 0
    out = capfd.readouterr().out
    assert all(f'== eval_{name}: done (' in out for name in ('clean', 'backdoored', 'clp'))
    eval_line = next(line for line in out.splitlines() if line.startswith('== eval: '))
    assert eval_line.endswith(f' --overwrite --device auto --data_root data --num_workers 2 --seed 100 '
                              f'--encoder {run}/mimic/model2.pth --names eval_mimic')
    redone = json.loads((run / 'eval_mimic' / 'metrics.json').read_text())
    assert redone['encoder'] == f'{run}/mimic/model2.pth' and '--resume' not in redone['argv']
    assert all(json.loads((run / f'eval_{name}' / 'metrics.json').read_text())['acc'] == 50.0
               for name in ('clean', 'backdoored', 'clp'))
    assert '"encoder": "eval_mimic"' in (run / 'eval.log').read_text()
    assert int((run / 'eval_seconds.txt').read_text()) >= 0
    assert json.loads((run / 'summary.json').read_text())['mimic']['acc'] == 60.0  # the table made after it

    # a probe made for another encoder file is redone, its defence's checkpoint read from defence.json
    (run / 'eval_clp' / 'metrics.json').write_text(json.dumps({'epoch': 3, 'encoder': 'another.pth'}))
    assert driver.main(flags) == 0
    out = capfd.readouterr().out
    assert 'eval_clp/metrics.json is for another encoder or probe length, evaluating again' in out
    assert all(f'== eval_{name}: done (' in out for name in ('clean', 'backdoored', 'mimic'))
    eval_line = next(line for line in out.splitlines() if line.startswith('== eval: '))
    assert eval_line.endswith(f' --encoder {run}/defence_clp/model_0.pth --names eval_clp')
    assert json.loads((run / 'eval_clp' / 'metrics.json').read_text())['encoder'] == f'{run}/defence_clp/model_0.pth'

    # a stage 3 that leaves a probe without metrics.json: status 2, naming it
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c pass\n')
    (run / 'eval_clean' / 'metrics.json').unlink()
    assert driver.main(flags) == 2
    assert capfd.readouterr().err == (f'run_pipeline.sh: eval_clean did not produce {run}/eval_clean/metrics.json '
                                      f'(see {run}/eval.log)\n')


STAND_IN_STAGE = '''import sys, time
from pathlib import Path
folder = Path(sys.argv[1])
print('progress 1\\rprogress 2\\rprogress 3', flush=True)
print('to stderr', file=sys.stderr, flush=True)
(folder / 'argv.txt').write_text(' '.join(sys.argv[2:]))
if sys.argv[2] == 'fail':
    sys.exit(3)
if sys.argv[2] == 'finish':
    (folder / 'model5.pth').write_bytes(b'')
print('half a line\\rlast state', end='')
'''


def test_stage_resumes_logs_times_and_fails_like_the_bash(tmp_path, capfd):
    script = tmp_path / 'stage.py'
    script.write_text(STAND_IN_STAGE)
    folder = tmp_path / 'run' / 'mimic'
    folder.mkdir(parents=True)

    def stage(mode: str) -> driver.Stage:
        return driver.Stage('mimic', (str(script), str(folder), mode), str(folder), 'model5.pth', 'model[0-9]*.pth',
                            str(tmp_path / 'run' / 'mimic.log'))

    # no checkpoint: started from scratch; what it printed is in the log as the terminal shows it
    driver.run([stage('finish')])
    assert (folder / 'argv.txt').read_text() == 'finish'
    out = capfd.readouterr().out
    assert f'== mimic: {script} {folder} finish \n' in out and 'progress 1\rprogress 2' in out
    log = (tmp_path / 'run' / 'mimic.log').read_bytes()
    assert log == b'progress 3\nto stderr\nlast state'
    assert int((folder / 'stage_seconds.txt').read_text()) >= 0

    # finished: skipped, the log and the time untouched
    (folder / 'stage_seconds.txt').write_text('40\n')
    driver.run([stage('finish')])
    assert f'== mimic: done ({folder}/model5.pth), skipped' in capfd.readouterr().out
    assert (folder / 'stage_seconds.txt').read_text() == '40\n'

    # interrupted (a checkpoint, no final file): continued with --resume, its time added to the earlier runs'
    (folder / 'model5.pth').rename(folder / 'model4.pth')
    driver.run([stage('finish')])
    assert (folder / 'argv.txt').read_text() == 'finish --resume'
    assert int((folder / 'stage_seconds.txt').read_text()) >= 40
    assert (tmp_path / 'run' / 'mimic.log').read_bytes().count(b'progress 3\n') == 2  # appended

    # a stage that fails: its exit status, and no message of ours; one that leaves no final file: status 2
    (folder / 'model5.pth').unlink()
    with pytest.raises(driver.PipelineError) as failed:
        driver.run([stage('fail')])
    assert failed.value.status == 3 and failed.value.message == ''
    with pytest.raises(driver.PipelineError) as unfinished:
        driver.run([stage('nothing')])
    assert unfinished.value.status == 2
    assert unfinished.value.message == f'mimic did not produce {folder}/model5.pth (see {tmp_path}/run/mimic.log)'


def test_reproduce_experiments_are_data_over_the_pipeline_settings():
    scale = reproduce_paper.scale_config('paper', 'P', environ={'EXTRA': '--amp'})
    experiments = reproduce_paper.experiments(scale, dry_run=True)
    assert list(experiments) == ['main', 'ratio', 'ablation', 'mi_model', 'budget', 'trigger_size', 'triggers']
    main = [v.setting for v in experiments['main'].variants]
    assert [s.attack for s in main] == ['badencoder', 'drupe'] * 3 + ['ctrl']
    assert all(s.defences == 'all' and s.clean_encoder == 'P/clean/model_1000.pth' for s in main)
    assert main[-1].badencoder_epochs == '800' and main[-1].badencoder_args.endswith(' --amp')
    assert experiments['main'].variants[-1].trigger == ('ctrl', '--kind ctrl')
    ratio = experiments['ratio'].variants
    assert [v.setting.ratio for v in ratio] == list(reproduce_paper.RATIOS)
    assert all(v.reuse_evals and v.setting.backdoored_encoder == scale.base_backdoor for v in ratio)
    assert experiments['ablation'].table_runs[0] == scale.base == 'P/main/cifar10_gtsrb_badencoder'
    for variants in experiments.values():  # every run is one the pipeline can plan
        for variant in variants.variants:
            assert driver.plan(variant.setting)[-1].argv[0] == 'scripts/results_table.py'
    with pytest.raises(driver.PipelineError, match="--scale: expected paper, demo or proportioned, got 'x'"):
        reproduce_paper.scale_config('x')
    seeded = reproduce_paper.experiments(dataclasses.replace(scale, seed='3'), dry_run=True)
    ratio = [v.setting for v in seeded['ratio'].variants]
    assert [s.run_dir for s in ratio[:2]] == ['P/ratio/ratio_0.01/seed_3', 'P/ratio/ratio_0.02/seed_3']
    assert all(s.seed == '3' and s.clean_encoder == 'P/clean/seed_3/model_1000.pth' and
               s.backdoored_encoder == 'P/main/cifar10_gtsrb_badencoder/seed_3/backdoor/model_200.pth' for s in ratio)
    assert seeded['ablation'].table_runs[0] == 'P/main/cifar10_gtsrb_badencoder/seed_3'
    assert all(v.setting.seed == '100' for v in experiments['ratio'].variants)  # no seed: the stages' default


def test_reproduce_of_finished_runs_skips_them(tmp_path, reference_file, capfd, monkeypatch):
    """--experiments mi_model at demo scale over runs finished by hand: no stage runs, the table is made."""
    monkeypatch.delenv('DATA_ROOT', raising=False)
    monkeypatch.delenv('EXTRA', raising=False)
    runs = tmp_path / 'paper'
    scale = reproduce_paper.scale_config('demo', str(runs))
    (runs / 'data' / 'synthetic_digits').mkdir(parents=True)
    (runs / 'data' / 'synthetic_digits' / 'test.npz').write_bytes(b'')
    (runs / 'reference').mkdir()
    for name in ('one', 'one_3'):
        (runs / 'reference' / f'{name}.npz').write_bytes(reference_file.read_bytes())
    (runs / 'clean').mkdir()
    (runs / 'clean' / 'model_20.pth').write_bytes(b'')
    base, student = Path(scale.base), runs / 'mi_model' / 'student'
    for run, mimic in [(base, base / 'mimic'), (student, student / 'mimic')]:
        mimic.mkdir(parents=True)
        (mimic / f'model{scale.mimic_epochs}.pth').write_bytes(b'')
    (base / 'backdoor').mkdir()
    (base / 'backdoor' / 'model_5.pth').write_bytes(b'')
    for run, name, encoder in [(base, 'clean', scale.clean_encoder), (base, 'backdoored', scale.base_backdoor),
                               (base, 'mimic', f'{base}/mimic/model{scale.mimic_epochs}.pth'),
                               (student, 'mimic', f'{student}/mimic/model{scale.mimic_epochs}.pth')]:
        (run / f'eval_{name}').mkdir()
        (run / f'eval_{name}' / 'metrics.json').write_text(json.dumps(
            {'acc': 50.0, 'asr': 10.0, 'asr_excluding_target': 9.0, 'epoch': 400, 'encoder': encoder}))
    (base / 'run.json').write_text('{}')
    # the base run's stage-3 log: the copied probes' lines go with them (plot_results.py draws their epochs)
    (base / 'eval.log').write_text(''.join(
        f'Train Epoch: 1 \tLoss: 1.0 \tEncoder: {name}\n'
        f'{{"metric": "Eval - Backdoored Accuracy (BA)", "value": 50.0, "epoch": 1, "encoder": "{name}"}}\n'
        for name in ('eval_clean', 'eval_backdoored', 'eval_mimic')))
    assert reproduce_paper.main(['--scale', 'demo', '--experiments', 'mi_model', str(runs)]) == 0
    out = capfd.readouterr().out
    assert '== eval_clean: the same encoder, trigger and probe as' in out  # copied from the base run
    assert (student / 'eval_backdoored' / 'metrics.json').is_file()
    copied = (student / 'eval.log').read_text().splitlines()
    assert len(copied) == 4 and not any('eval_mimic' in line for line in copied)
    for stage in ['backdoor', 'mimic', 'eval_clean', 'eval_backdoored', 'eval_mimic']:
        assert f'== {stage}: ' in out and f'== {stage}: {reproduce_paper.PAPER_TRIGGER}' not in out
    assert 'train_' not in out and 'MIMIC.py' not in out  # nothing trained
    assert json.loads((student / 'run.json').read_text())['label'] == 'MI on the initial student'
    assert (runs / 'mi_model' / 'table.md').is_file() and f'tables: {runs}/mi_model/table.md ' in out


@pytest.mark.process
def test_the_wrappers_run_the_python_of_the_tests_not_the_first_on_path(tmp_path):
    # a `python` first on PATH that is not this interpreter (a venv that is not activated): the wrappers must not
    # start it, since conftest hands them this one as $PYTHON
    bogus = tmp_path / 'bin' / 'python'
    bogus.parent.mkdir()
    bogus.write_text('#!/bin/sh\necho "the wrong python" >&2\nexit 97\n')
    bogus.chmod(0o755)
    env = dict(os.environ, PATH=f'{bogus.parent}{os.pathsep}{os.environ["PATH"]}')
    assert env['PYTHON'] == sys.executable
    for wrapper in ('run_pipeline.sh', 'reproduce_paper.sh'):
        result = subprocess.run(['bash', f'scripts/{wrapper}', '--help'], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        assert 'the wrong python' not in result.stderr, wrapper
    without = dict(env)
    del without['PYTHON']  # the wrapper's default is `python` on PATH, as its header says
    result = subprocess.run(['bash', 'scripts/reproduce_paper.sh', '--dry_run'], cwd=REPO, env=without,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 97 and 'the wrong python' in result.stderr


def test_proportioned_scale_keeps_the_papers_proportions():
    scale = reproduce_paper.scale_config('proportioned', 'P', environ={})
    budget = reproduce_paper.budgets(scale)
    pre, clean = budget['pre-training'], budget['clean data']
    assert clean <= 0.05 * budget['pre-training set'] and clean >= 4 * 64  # D: at most 5%, several batches of 64
    assert budget['backdoor'] == pre // 5  # BadEncoder's 200 epochs against 1000 of pre-training
    for defence in ('mimic',) + driver.ALL_DEFENCES:
        assert budget[defence] <= 0.10 * pre, defence
    assert budget['mimic'] == budget['ft'] == 0.04 * pre and budget['clp'] == 0
    paper = reproduce_paper.budgets(reproduce_paper.scale_config('paper', environ={}))
    assert paper['mimic'] == 0.04 * paper['pre-training'] and paper['backdoor'] == paper['pre-training'] // 5


def test_budgets_read_the_defences_own_defaults():
    import baseline_defence
    parsed = baseline_defence.get_args_parser().parse_args(['--defence', 'ft', '--teacher', 'x.pth'])
    assert {flag: getattr(parsed, flag[2:]) for flag in reproduce_paper.DEFENCE_DEFAULTS} == \
        reproduce_paper.DEFENCE_DEFAULTS
    assert reproduce_paper.flag_value('--batch_size 64 --lr 1 --batch_size 32', '--batch_size', 128) == 32
    assert reproduce_paper.flag_value('', '--anp_iterations', 2000) == 2000


def test_the_proportions_table_in_the_docs_follows_from_the_flags():
    text = (REPO / 'docs' / 'PROPORTIONED.md').read_text()
    assert reproduce_paper.standard_proportions() in text


@pytest.mark.process
def test_proportioned_dry_run_shares_one_clean_encoder_and_runs_each_task_over_its_seeds(tmp_path):
    runs = tmp_path / 'prop'
    result = dry_run('--scale', 'proportioned', '--seeds', '0,1', str(runs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    clean = [line for line in lines if 'train_clean_encoder.py' in line]
    assert len(clean) == 1 and ' --seed ' not in clean[0] and f'--results_dir {runs}/clean ' in clean[0]
    assert 'python -m datasets.prepare sklearn_digits --out' in result.stdout
    main = f'{runs}/main/synthetic_shapes'
    assert [line for line in lines if line.startswith('== run ')] == [
        f'== run {main}_synthetic_digits_badencoder/seed_0', f'== run {main}_synthetic_digits_badencoder/seed_1',
        f'== run {main}_sklearn_digits_badencoder/seed_0', f'== run {main}_sklearn_digits_badencoder/seed_1']
    assert 'train_badencoder.py --attack drupe' not in result.stdout and 'datasets.poison' not in result.stdout
    epochs = int(reproduce_paper.scale_config('proportioned', environ={}).mimic_epochs)
    curve = ' '.join(f'mimic_{epoch}' for epoch in range(10, epochs, 10))  # MIMIC's checkpoints, each probed
    assert result.stdout.count(f'--results_dir {main}_synthetic_digits_badencoder/seed_0/mimic_curve ') == 1
    assert result.stdout.count(f'--names {curve}\n') == 4
    assert not runs.exists()


TOOLS = ('benchmark', 'keep_summaries', 'pipeline', 'plot_results', 'repeat_tests', 'reproduce_paper',
         'results_table', 'investigate.compare_original', 'investigate.original_harness', 'investigate.sweep_shapes')
LIBRARIES = ('__init__', 'bench_tools', 'investigate.__init__',  # bench_tools: benchmark's and the harness's
             'results.__init__', 'results.runs', 'results.stats')  # the run reader and statistics of the tools


@pytest.mark.process
def test_every_tool_and_wrapper_answers_help():
    modules = [path.relative_to(REPO / 'scripts').with_suffix('') for path in (REPO / 'scripts').rglob('*.py')]
    assert sorted(TOOLS + LIBRARIES) == sorted('.'.join(module.parts) for module in modules)
    for tool in TOOLS:
        result = subprocess.run([sys.executable, '-m', f'scripts.{tool}', '--help'], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and len(result.stdout.splitlines()) > 3, (tool, result.stderr[-500:])
    for wrapper in sorted((REPO / 'scripts').glob('*.sh')):
        result = subprocess.run(['bash', str(wrapper), '--help'], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and len(result.stdout.splitlines()) > 3, (wrapper.name, result.stderr[-500:])
        assert not (REPO / '--help').exists()  # demo.sh's OUT_DIR is not '--help'
