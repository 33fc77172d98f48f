"""scripts/results_table.py: reading run directories and writing the Markdown/CSV table and summary."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import results_table  # noqa: E402


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
