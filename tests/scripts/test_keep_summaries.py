"""scripts/keep_summaries.py: a run folder's summaries copied to another tree, checkpoints, data and printed logs
left behind; a kept file with other content is refused unless --overwrite."""
from __future__ import annotations

import json
from pathlib import Path

from scripts import keep_summaries


def make_run(root: Path) -> Path:
    """A small run folder of seeds as the pipeline leaves it: summaries beside checkpoints, data and logs."""
    files = {'summary.json': '{"n": 1}', 'table.md': '| t |', 'table_seeds.csv': 'a\n', 'reference_one.npz': 'x',
             'data/synthetic_digits/meta.json': '{}', 'seed_0/run.json': '{"seed": 0}', 'seed_0/backdoor.log': 'bar',
             'seed_0/backdoor/model_5.pth': 'w', 'seed_0/backdoor/log.csv': 'epoch\n1\n',
             'seed_0/backdoor/stage_seconds.txt': '12', 'seed_0/eval_mimic/metrics.json': '{"acc": 50.0}',
             'seed_0/eval_mimic/probe_400.pth': 'w', 'seed_0/defence_ft/defence.json': '{}',
             'seed_0/table.csv': 'derived\n', 'seed_0/defence_x/table.json': '{}', 'seed_0/data/notes.txt': 'x'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_only_the_summaries_are_kept_in_their_tree(tmp_path, capsys):
    run = make_run(tmp_path / 'run')
    assert keep_summaries.main([str(run), str(tmp_path / 'kept')]) == 0
    kept = sorted(str(path.relative_to(tmp_path / 'kept')) for path in (tmp_path / 'kept').rglob('*') if path.is_file())
    assert kept == ['seed_0/backdoor/log.csv', 'seed_0/backdoor/stage_seconds.txt', 'seed_0/data/notes.txt',
                    'seed_0/defence_ft/defence.json', 'seed_0/defence_x/table.json', 'seed_0/eval_mimic/metrics.json',
                    'seed_0/run.json', 'summary.json']
    assert json.loads((tmp_path / 'kept/seed_0/eval_mimic/metrics.json').read_text()) == {'acc': 50.0}
    assert '8 file(s) copied' in capsys.readouterr().out


def test_running_again_keeps_what_is_there_and_refuses_other_content(tmp_path, capsys):
    run = make_run(tmp_path / 'run')
    out = tmp_path / 'kept'
    assert keep_summaries.keep(run, out) == (8, 0)
    (run / 'seed_0/eval_mimic/metrics.json').write_text('{"acc": 51.0}')
    (run / 'seed_0/defence_nad').mkdir()
    (run / 'seed_0/defence_nad/defence.json').write_text('{}')
    assert keep_summaries.main([str(run), str(out)]) == 2
    assert 'exist with other content' in capsys.readouterr().err
    assert not (out / 'seed_0/defence_nad').exists()  # a refusal copies nothing
    assert keep_summaries.keep(run, out, overwrite=True) == (2, 7)
    assert json.loads((out / 'seed_0/eval_mimic/metrics.json').read_text()) == {'acc': 51.0}


def test_a_folder_without_summaries_or_a_destination_inside_the_run_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    run = make_run(tmp_path / 'run')
    assert keep_summaries.main([str(tmp_path / 'empty'), str(tmp_path / 'kept')]) == 2
    assert keep_summaries.main([str(tmp_path / 'absent'), str(tmp_path / 'kept')]) == 2
    assert keep_summaries.main([str(run), str(run / 'kept')]) == 2  # its second run would keep the first's copy
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f'error: {tmp_path / "empty"}: holds no summary (.json, .csv or .txt file): not a run folder?',
                      f'error: {tmp_path / "absent"}: not a folder',
                      f'error: {run / "kept"} is inside {run}: keep the summaries somewhere else']
    assert not (run / 'kept').exists()
