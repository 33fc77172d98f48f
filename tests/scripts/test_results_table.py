"""scripts/results_table.py: reading run directories and writing the Markdown/CSV table and summary; the statistics
over seeds (scripts/results/stats.py)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from scripts import results_table
from scripts.results import stats


def make_run(root: Path, pretraining: str, downstream: str, metrics: dict) -> Path:
    run = root / f'{pretraining}_{downstream}'
    run.mkdir(parents=True)
    (run / 'run.json').write_text(json.dumps({'pretraining_dataset': pretraining,
                                              'downstream_dataset': downstream}))
    for encoder, values in metrics.items():
        (run / f'eval_{encoder}').mkdir()
        (run / f'eval_{encoder}' / 'metrics.json').write_text(json.dumps(values))
    return run


METRICS = {'clean': {'acc': 81.84, 'asr': 2.5, 'asr_excluding_target': 1.0},
           'backdoored': {'acc': 82.27, 'asr': 98.64, 'asr_excluding_target': 98.5},
           'mimic': {'acc': 80.0, 'asr': 4.125, 'asr_excluding_target': 3.0}}


def test_markdown_csv_and_summary(tmp_path):
    svhn = make_run(tmp_path, 'cifar10', 'svhn', {'clean': METRICS['clean']})
    gtsrb = make_run(tmp_path, 'cifar10', 'gtsrb', METRICS)
    out = tmp_path / 'table'
    assert results_table.main([str(svhn), str(gtsrb), '--out', str(out)]) == 0
    md = out.with_suffix('.md').read_text().splitlines()
    assert md[0].startswith('| Pre-training | Downstream | Attack | clean ACC | clean ASR | clean ASR* |')
    assert md[2] == ('| cifar10 | gtsrb | badencoder | 81.84 | 2.50 | 1.00 | 82.27 | 98.64 | 98.50 | 80.00 | 4.12 | 3.00 |')
    assert md[3].startswith('| cifar10 | svhn | badencoder | 81.84 | 2.50 | 1.00 | – | – |')
    rows = list(csv.DictReader(out.with_suffix('.csv').open()))
    assert [r['downstream'] for r in rows] == ['gtsrb', 'svhn']
    assert rows[0]['backdoored_asr'] == '98.64' and rows[1]['mimic_acc'] == ''

    summary_path = tmp_path / 'summary.json'
    assert results_table.main([str(gtsrb), '--summary', str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary['backdoored'] == METRICS['backdoored']
    assert summary['mimic']['asr'] == 4.125


@pytest.mark.parametrize('breakage', ['no_dir', 'no_run_json', 'no_metrics', 'bad_json'])
def test_bad_run_directory_is_one_line_error(tmp_path, capsys, breakage):
    run = make_run(tmp_path, 'cifar10', 'gtsrb', METRICS)
    if breakage == 'no_dir':
        run = tmp_path / 'missing'
    elif breakage == 'no_run_json':
        (run / 'run.json').unlink()
    elif breakage == 'no_metrics':
        for encoder in METRICS:
            (run / f'eval_{encoder}' / 'metrics.json').unlink()
    else:
        (run / 'eval_mimic' / 'metrics.json').write_text('{not json')
    assert results_table.main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and str(run) in err[0]


def test_summary_needs_one_run(tmp_path, capsys):
    a = make_run(tmp_path, 'cifar10', 'gtsrb', METRICS)
    b = make_run(tmp_path, 'cifar10', 'svhn', METRICS)
    assert results_table.main([str(a), str(b), '--summary', str(tmp_path / 's.json')]) == 2
    assert not (tmp_path / 's.json').exists()


def test_defence_rows_summary_and_csv(tmp_path):
    run = make_run(tmp_path, 'cifar10', 'gtsrb', {**METRICS, 'clp': {'acc': 70.0, 'asr': 50.0,
                                                                     'asr_excluding_target': 49.0}})
    (run / 'mimic').mkdir()
    (run / 'mimic' / 'stage_seconds.txt').write_text('120\n')
    (run / 'defence_clp').mkdir()
    (run / 'defence_clp' / 'stage_seconds.txt').write_text('7\n')
    out = tmp_path / 'table'
    assert results_table.main([str(run), '--out', str(out), '--summary', str(tmp_path / 's.json')]) == 0
    md = out.with_suffix('.md').read_text()
    assert '| cifar10 | gtsrb | badencoder | mimic | 80.00 | 4.12 | 3.00 | -2.27 | 120 |' in md
    assert '| cifar10 | gtsrb | badencoder | clp | 70.00 | 50.00 | 49.00 | -12.27 | 7 |' in md
    rows = list(csv.DictReader((tmp_path / 'table_defences.csv').open()))
    assert [r['defence'] for r in rows] == ['mimic', 'clp'] and rows[1]['seconds'] == '7.0'
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['defences']['clp'] == {'acc': 70.0, 'asr': 50.0, 'asr_excluding_target': 49.0, 'seconds': 7.0}
    assert summary['defences']['mimic']['seconds'] == 120.0 and summary['mimic']['acc'] == 80.0


def test_no_baselines_keeps_the_summary_as_before(tmp_path):
    run = make_run(tmp_path, 'cifar10', 'gtsrb', METRICS)
    assert results_table.main([str(run), '--summary', str(tmp_path / 's.json')]) == 0
    assert set(json.loads((tmp_path / 's.json').read_text())) == {'clean', 'backdoored', 'mimic'}


def test_table_picks_the_encoders_or_the_defences_table(tmp_path, capsys):
    run = make_run(tmp_path, 'cifar10', 'gtsrb', {**METRICS, 'clp': {'acc': 70.0, 'asr': 50.0,
                                                                     'asr_excluding_target': 49.0}})
    assert results_table.main([str(run), '--table', 'encoders']) == 0
    encoders = capsys.readouterr().out
    assert encoders.startswith('| Pre-training | Downstream | Attack | clean ACC |') and 'Defence' not in encoders
    assert results_table.main([str(run), '--table', 'defences']) == 0
    defences = capsys.readouterr().out
    assert defences.startswith('| Pre-training | Downstream | Attack | Defence | ACC |') and 'clean ACC' not in defences
    assert results_table.main([str(run)]) == 0
    assert capsys.readouterr().out == encoders.rstrip('\n') + '\n\n## Defences\n\n' + defences
    plain = make_run(tmp_path / 'plain', 'cifar10', 'gtsrb', METRICS)
    assert results_table.main([str(plain), '--table', 'defences']) == 2
    assert capsys.readouterr().err == 'error: --table defences: no baseline defence was evaluated in these runs\n'


def test_pages_and_run_directories_do_not_mix(tmp_path):
    run = make_run(tmp_path, 'cifar10', 'gtsrb', METRICS)
    for argv in (['--check', 'page.md', str(run)], ['--write', 'page.md', '--out', 'x'], []):
        with pytest.raises(SystemExit):
            results_table.main(argv)


@pytest.mark.process
def test_the_table_imports_no_torch():
    """results_table reads runs without torch: the per-epoch logs that need evaluation.metrics are not read."""
    check = 'import sys; import scripts.results_table; assert "torch" not in sys.modules, "torch imported"'
    result = subprocess.run([sys.executable, '-c', check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- seeds: the statistics, the grouping, the tables and the summary ---------------------------------------------

def test_mean_std_and_half_width_of_known_values():
    assert stats.mean([1.0, 2.0, 3.0]) == 2.0
    assert stats.sample_std([1.0, 2.0, 3.0]) == 1.0
    assert stats.ci95_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.302652729749464 / 3 ** 0.5)  # 2.484
    assert stats.sample_std([2.0, 4.0]) == pytest.approx(2 ** 0.5)
    assert stats.ci95_half_width([2.0, 4.0]) == pytest.approx(12.706204736174707)  # t_{0.975,1}·√2/√2
    assert stats.sample_std([7.0]) is None and stats.ci95_half_width([7.0]) is None
    single = stats.estimate([None, 7.0])
    assert single == stats.Estimate(1, 7.0, None, None) and not single.excludes_zero
    assert stats.estimate([None]) is None


def test_t_central_probability_of_known_values():
    """A(t | ν) = P(|T| < t): ν = 1 is Cauchy (A(1) = 1/2); ν = 2 has A = t / √(t² + 2); ν = 3 at t = √3
    (θ = π/4) is (2/π)(π/4 + 1/2) = 1/2 + 1/π; ν = 4 at t = 2 (c² = 1/2) is (1/√2)(1 + 1/4) = 5/(4√2)."""
    assert stats.t_central_probability(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert stats.t_central_probability(2 ** 0.5, 2) == pytest.approx(0.5 ** 0.5, abs=1e-15)
    assert stats.t_central_probability(3 ** 0.5, 3) == pytest.approx(0.5 + 1 / math.pi, abs=1e-15)
    assert stats.t_central_probability(2.0, 4) == pytest.approx(5 / (4 * 2 ** 0.5), abs=1e-15)
    # ν = 5 at t = √5 (θ = π/4, c² = 1/2): (2/π)(π/4 + (1/√2)(1/√2 + (2/3)(1/√2)³)) = 1/2 + 4/(3π)
    assert stats.t_central_probability(5 ** 0.5, 5) == pytest.approx(0.5 + 4 / (3 * math.pi), abs=1e-15)
    assert stats.t_central_probability(0.0, 7) == 0.0


def test_t_quantile_exact_and_its_expansion():
    assert stats.t_975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-12)  # Cauchy: tan(π(p−½))
    assert stats.t_975(2) == pytest.approx(0.95 * (2 / (1 - 0.95 ** 2)) ** 0.5, abs=1e-12)
    assert stats.t_975(3) == pytest.approx(3.182446305283710, abs=1e-12)  # the exact quantiles, 16 digits
    assert stats.t_975(30) == pytest.approx(2.042272456301238, abs=1e-12)
    assert stats.t_975(120) == pytest.approx(1.979930405082422, abs=1e-12)
    assert stats.t_975(1000) == pytest.approx(stats.t_975(1001), abs=1e-5)  # the two methods meet
    assert stats.t_975(10 ** 7) == pytest.approx(stats.Z_975, abs=1e-6)
    with pytest.raises(ValueError):
        stats.t_975(0)
    scipy_stats = pytest.importorskip('scipy.stats')  # a check against scipy where it is installed (not a dependency)
    for df in list(range(1, 80)) + [200, 1000, 1001, 5000]:
        assert stats.t_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-12), df


def test_paired_differences_and_whether_the_interval_excludes_zero():
    baseline, mimic = {'0': 10.0, '1': 12.0, '2': None, '3': 5.0}, {'0': 8.0, '1': 9.0, '2': 1.0}
    assert stats.paired_differences(baseline, mimic) == {'0': 2.0, '1': 3.0}  # the seeds both have
    wide = stats.estimate([2.0, 3.0])
    assert wide.mean == 2.5 and wide.ci95 == pytest.approx(stats.t_975(1) * 0.5) and not wide.excludes_zero
    narrow = stats.estimate(list(stats.paired_differences({'0': 3, '1': 4, '2': 5},
                                                                         {'0': 1, '1': 1, '2': 1}).values()))
    assert (narrow.mean, narrow.std) == (3.0, 1.0) and narrow.ci95 == pytest.approx(2.4842, abs=1e-4)
    assert narrow.excludes_zero
    assert stats.estimate([-3.0, -4.0, -5.0]).excludes_zero


def seed_run(root: Path, name: str, seed, acc: float, asr: float, defences: dict | None = None,
             **setting) -> Path:
    """A pipeline run folder whose run.json holds `seed` (and `setting`), with clean/backdoored/mimic metrics made
    from acc and asr, a baseline per `defences` entry ({name: (acc, asr)}), and MIMIC's and each baseline's time."""
    run = root / name
    run.mkdir(parents=True)
    (run / 'run.json').write_text(json.dumps({'pretraining_dataset': 'cifar10', 'downstream_dataset': 'gtsrb',
                                              'attack': 'badencoder', 'ratio': 0.04, 'seed': seed, **setting}))
    metrics = {'clean': (acc + 2, 1.0), 'backdoored': (acc + 1, 95.0), 'mimic': (acc, asr), **(defences or {})}
    for encoder, (value_acc, value_asr) in metrics.items():
        (run / f'eval_{encoder}').mkdir()
        (run / f'eval_{encoder}' / 'metrics.json').write_text(json.dumps(
            {'acc': value_acc, 'asr': value_asr, 'asr_excluding_target': value_asr - 1}))
    for folder in ['mimic'] + [f'defence_{name}' for name in defences or {}]:
        (run / folder).mkdir()
        (run / folder / 'stage_seconds.txt').write_text(f'{10 + int(seed or 0)}\n')
    return run


def test_a_resumed_stage_has_no_time(tmp_path):
    """The pipeline records the time of the run that finished a stage; one that resumed it (args.json "resume":
    true) ran only what remained, so its time is left out: '–' for one run, (n=k) over seeds."""
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80, 10, {'ft': (70, 5)}) for seed in (0, 1, 2)]
    for seed, run in enumerate(runs):  # seconds: 10 + seed for MIMIC and ft
        (run / 'defence_ft' / 'args.json').write_text(json.dumps({'defence': 'ft', 'resume': seed == 1}))
    assert results_table.main([str(runs[1]), '--out', str(tmp_path / 'one')]) == 0
    assert '| 11 |' in (tmp_path / 'one.md').read_text()  # MIMIC's time
    assert '| badencoder | ft | 70.00 | 5.00 | 4.00 | -11.00 | – |' in (tmp_path / 'one.md').read_text()
    assert results_table.main([*map(str, runs), '--out', str(tmp_path / 'three')]) == 0
    md = (tmp_path / 'three.md').read_text()
    assert '| 11 ± 2 |' in md  # MIMIC: 10, 11, 12
    assert '| 11 ± 13 (n=2) |' in md  # ft: 10 and 12, seed 1's resumed 11 left out


def test_runs_that_differ_only_in_seed_make_one_row_and_three_per_seed_rows(tmp_path):
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, acc, asr) for seed, acc, asr in [(0, 80, 10), (1, 81, 12),
                                                                                      (2, 82, 14)]]
    out = tmp_path / 'table'
    assert results_table.main([*map(str, runs), '--out', str(out)]) == 0
    md = out.with_suffix('.md').read_text().splitlines()
    assert md[0].startswith('| Pre-training | Downstream | Attack | n | clean ACC |') and len(md[2:md.index('')]) == 1
    assert md[2] == ('| cifar10 | gtsrb | badencoder | 3 | 83.00 ± 2.48 | 1.00 ± 0.00 | 0.00 ± 0.00 | 82.00 ± 2.48 '
                     '| 95.00 ± 0.00 | 94.00 ± 0.00 | 81.00 ± 2.48 | 12.00 ± 4.97 | 11.00 ± 4.97 |')
    rows = list(csv.DictReader(out.with_suffix('.csv').open()))
    assert len(rows) == 1 and rows[0]['n'] == '3'
    assert (rows[0]['mimic_asr'], rows[0]['mimic_asr_std'], rows[0]['mimic_asr_ci95'], rows[0]['mimic_asr_n']) == (
        '12.0000', '2.0000', '4.9683', '3')
    seeds = list(csv.DictReader((tmp_path / 'table_seeds.csv').open()))
    assert [(row['seed'], row['mimic_asr'], row['run_dir']) for row in seeds] == [
        ('0', '10.00', str(runs[0])), ('1', '12.00', str(runs[1])), ('2', '14.00', str(runs[2]))]


def test_runs_that_differ_in_anything_else_are_kept_apart(tmp_path):
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80, 10) for seed in (0, 1, 2)]
    other_ratio = seed_run(tmp_path, 'ratio', 1, 70, 20, ratio=0.1)  # another setting, one of the same seeds
    same_seed = seed_run(tmp_path, 'again', 2, 60, 30)  # the same setting and seed once more: not a new seed
    no_seed = seed_run(tmp_path, 'old', None, 50, 40)  # a run.json without a seed is never pooled
    out = tmp_path / 'table'
    assert results_table.main([*map(str, runs + [other_ratio, same_seed, no_seed]), '--out', str(out)]) == 0
    rows = list(csv.DictReader(out.with_suffix('.csv').open()))
    assert [(row['n'], row['mimic_acc'], row['mimic_acc_ci95']) for row in rows] == [
        ('3', '80.0000', '0.0000'), ('1', '70.0000', ''), ('1', '60.0000', ''), ('1', '50.0000', '')]
    assert len(list(csv.DictReader((tmp_path / 'table_seeds.csv').open()))) == 6
    groups = results_table.seed_groups([results_table.read_run(run) for run in runs[:2] + [other_ratio]])
    assert [len(group) for group in groups] == [2, 1]


def test_the_baselines_a_run_also_ran_do_not_make_it_another_setting(tmp_path):
    # seed 0 ran ft beside MIMIC (its run.json lists it), seeds 1 and 2 did not: one setting, ft on one seed
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80, 10, {'ft': (82.0, 5.0)} if seed == 0 else None)
            for seed in (0, 1, 2)]
    for seed, run in enumerate(runs):
        setting = json.loads((run / 'run.json').read_text())
        (run / 'run.json').write_text(json.dumps({**setting, 'defences': 'ft' if seed == 0 else ''}))
    groups = results_table.seed_groups([results_table.read_run(run) for run in runs])
    assert [len(group) for group in groups] == [3]
    rows = {row['defence']: row for row in results_table.defence_rows(groups)}
    assert (rows['mimic']['n'], rows['ft']['n'], rows['ft']['pairs']) == (3, 1, 1)


def test_seeded_defences_table_compares_each_baseline_with_mimic_on_the_same_seeds(tmp_path):
    # clp's ASR is MIMIC's + 20, 21, 22 on seeds 0, 1, 2: a difference whose interval excludes zero; ft's ACC
    # differs from MIMIC's by +1 and 0 (seeds 0 and 1; seed 2 has no ft): an interval that holds zero
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80 + seed, 10 + seed,
                     {'clp': (70.0, 30.0 + 2 * seed), **({'ft': (81.0, 10.0 + seed)} if seed < 2 else {})})
            for seed in (0, 1, 2)]
    out = tmp_path / 'table'
    assert results_table.main([*map(str, runs), '--out', str(out)]) == 0
    md = out.with_suffix('.md').read_text()
    assert '| Defence | n | ACC | ASR | ASR* | ΔACC | Time (s) | ACC - MIMIC | ASR - MIMIC | ASR* - MIMIC |' in md
    assert ('| cifar10 | gtsrb | badencoder | clp | 3 | 70.00 ± 0.00 | 32.00 ± 4.97 | 31.00 ± 4.97 | -12.00 ± 2.48 '
            '| 11 ± 2 | **-11.00 ± 2.48** | **+21.00 ± 2.48** | **+21.00 ± 2.48** |') in md
    assert ('| ft | 2 | 81.00 ± 0.00 | 10.50 ± 6.35 | 9.50 ± 6.35 | -0.50 ± 6.35 | 10 ± 6 | +0.50 ± 6.35 '
            '| +0.00 ± 0.00 | +0.00 ± 0.00 |') in md
    assert ('| mimic | 3 | 81.00 ± 2.48 | 11.00 ± 2.48 | 10.00 ± 2.48 | -1.00 ± 0.00 | 11 ± 2 | – | – | – |'
            in md)
    rows = {row['defence']: row for row in csv.DictReader((tmp_path / 'table_defences.csv').open())}
    assert list(rows) == ['mimic', 'ft', 'clp']
    clp, ft = rows['clp'], rows['ft']
    assert (clp['pairs'], clp['asr_vs_mimic'], clp['asr_vs_mimic_std'], clp['asr_vs_mimic_ci95'],
            clp['asr_vs_mimic_excludes_zero']) == ('3', '21.0000', '1.0000', '2.4841', 'true')  # 4.30265·1/√3
    assert (ft['pairs'], ft['acc_vs_mimic'], ft['acc_vs_mimic_excludes_zero']) == ('2', '0.5000', 'false')
    assert rows['mimic']['asr_vs_mimic'] == '' and rows['mimic']['pairs'] == '0'


def test_summary_over_seeds_holds_means_intervals_and_per_seed_values(tmp_path):
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80 + 2 * seed, 10.0, {'clp': (70.0, 30.0 + seed)})
            for seed in (0, 1)]
    path = tmp_path / 's.json'
    assert results_table.main([*map(str, runs), '--summary', str(path)]) == 0
    summary = json.loads(path.read_text())
    mimic = summary['mimic']
    assert (mimic['acc'], mimic['n'], mimic['acc_std'], mimic['asr_std'], mimic['asr_ci95']) == (81.0, 2, 2 ** 0.5,
                                                                                               0.0, 0.0)
    assert mimic['acc_ci95'] == pytest.approx(12.706204736174707)
    assert mimic['per_seed'] == {'0': {'acc': 80, 'asr': 10.0, 'asr_excluding_target': 9.0},
                                 '1': {'acc': 82, 'asr': 10.0, 'asr_excluding_target': 9.0}}
    clp = summary['defences']['clp']
    assert (clp['asr'], clp['seconds'], clp['seconds_std'], clp['n']) == (30.5, 10.5, 0.5 ** 0.5, 2)
    assert clp['per_seed']['1'] == {'acc': 70.0, 'asr': 31.0, 'asr_excluding_target': 30.0, 'seconds': 11.0}
    other = seed_run(tmp_path, 'other', 2, 80, 10, ratio=0.5)
    assert results_table.main([*map(str, runs), str(other), '--summary', str(tmp_path / 'no.json')]) == 2
    assert not (tmp_path / 'no.json').exists()


def test_the_seeds_table_shows_every_runs_acc_and_asr_star(tmp_path, capsys):
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80 + seed, 10 + seed, {'ft': (70.0, 3.0)} if seed else None)
            for seed in (0, 1)]
    assert results_table.main([*map(str, runs), '--table', 'seeds']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '| Pre-training | Downstream | Attack | Seed | clean | backdoored | mimic | ft |'
    assert lines[2] == '| cifar10 | gtsrb | badencoder | 0 | 82.0 / 0.0 | 81.0 / 94.0 | 80.0 / 9.0 | – |'
    assert lines[3] == '| cifar10 | gtsrb | badencoder | 1 | 83.0 / 0.0 | 82.0 / 94.0 | 81.0 / 10.0 | 70.0 / 2.0 |'


def test_the_curve_table_shows_mimics_checkpoints_and_its_loss(tmp_path, capsys):
    run = seed_run(tmp_path, 'seed_0', 0, 80, 10, mimic_epochs=20)
    (run / 'mimic_curve' / 'mimic_10').mkdir(parents=True)
    (run / 'mimic_curve' / 'mimic_10' / 'metrics.json').write_text(json.dumps(
        {'acc': 50.0, 'asr': 30.0, 'asr_excluding_target': 25.5}))
    (run / 'mimic' / 'log.csv').write_text('epoch,loss\n10,3.25\n20,2.0\n')
    assert results_table.main([str(run), '--table', 'curve']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '| Pre-training | Downstream | Attack | Seed | epoch 10 | epoch 20 |'
    assert lines[2] == '| cifar10 | gtsrb | badencoder | 0 | 50.0 / 25.5 (3.2) | 80.0 / 9.0 (2.0) |'
    bare = seed_run(tmp_path, 'bare', 0, 80, 10)
    assert results_table.main([str(bare), '--table', 'curve']) == 2
    assert 'no run probed its MIMIC checkpoints' in capsys.readouterr().err


def test_runs_that_reuse_their_own_seeds_encoder_are_one_setting(tmp_path, capsys):
    """The budget experiment's seed_<s> reuses main's seed_<s>/backdoor: the path differs by the seed alone."""
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80, 10, backdoored_encoder=f'runs/main/seed_{seed}/m.pth')
            for seed in (0, 1)]
    other = seed_run(tmp_path, 'other', 2, 80, 10, backdoored_encoder='runs/main/seed_0/m.pth')
    assert [len(group) for group in results_table.read_groups([*runs, other])] == [2, 1]


def test_provenance_lists_what_the_stages_recorded_once_each(tmp_path):
    runs = [seed_run(tmp_path, f'seed_{seed}', seed, 80, 10) for seed in (0, 1)]
    environment = {'code': 'abc123def456', 'torch': '2.14.1', 'cpu_threads': 1, 'world_size': 1,
                   'cpu': 'AMD EPYC (family 25, model 17)', 'cpu_capability': 'AVX512'}
    stages = {runs[0] / 'mimic': {**environment, 'started': '2026-12-07T10:00:00+00:00'},
              runs[1] / 'mimic': {**environment, 'started': '2026-12-08T09:00:00+00:00', 'cpu_threads': 2},
              runs[1] / 'eval_mimic': {'torch': '2.14.1', 'cpu_threads': 1, 'world_size': 2}}  # an older version
    for folder, recorded in stages.items():
        (folder / 'args.json').write_text(json.dumps({'seed': 0, 'environment': recorded}))
    (runs[0] / 'eval_clean' / 'args.json').write_text(json.dumps({'seed': 0}))  # no environment at all
    groups = results_table.seed_groups([results_table.read_run(run) for run in runs])
    table = results_table.render(groups, 'provenance').splitlines()
    assert table[0] == '| Pre-training | Downstream | Attack | n | Code | CPU | Threads | torch | Started |'
    assert table[2] == ('| cifar10 | gtsrb | badencoder | 2 | abc123def456 | AMD EPYC (family 25, model 17) (AVX512) '
                        '| 1, 2 (torchrun: 2 processes) | 2.14.1 | 2026-12-07 to 2026-12-08 |')
    bare = seed_run(tmp_path, 'bare', 5, 80, 10)
    with pytest.raises(results_table.RunError, match='recorded its environment'):
        results_table.render([[results_table.read_run(bare)]], 'provenance')
