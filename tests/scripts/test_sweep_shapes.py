"""scripts/investigate/sweep_shapes.py: the grid it builds, how it reads an exit status, and a bounded subset of the sweep."""
from __future__ import annotations

import json
import signal

import pytest

from scripts.investigate import sweep_shapes
from scripts.investigate.sweep_shapes import Run, grid, outcome


def test_grid_applies_each_axis_only_where_it_means_something():
    runs = grid(['clean', 'probe', 'defence:clp', 'drupe'], ['uneven', 'batch_gt_set', 'one_reference'], [4, 8],
                [1, 2], ['default', 'AVX2'], ['tensor', 'pil'])
    by_stage = {stage: [run for run in runs if run.stage == stage] for stage in ('clean', 'probe', 'defence:clp', 'drupe')}
    assert len(by_stage['clean']) == 2 * 2 * 2 * 2 * 2  # no one_reference (it reads none); both paths
    assert {run.case for run in by_stage['clean']} == {'uneven', 'batch_gt_set'}
    assert len(by_stage['probe']) == 3 * 2 * 2 * 2 and {run.augment for run in by_stage['probe']} == {'-'}
    assert len(by_stage['defence:clp']) == 2 * 2 * 2  # data-free: one data case, no augmentation
    assert len(by_stage['drupe']) == 3 * 2 * 2 * 2 * 2
    assert len(set(runs)) == len(runs)


def test_outcome_reads_the_exit_status():
    assert outcome(0, 'a warning\n') == ('finished', '')
    assert outcome(2, 'error: --batch_size 32: too large\n') == ('error', 'error: --batch_size 32: too large')
    assert outcome(-signal.SIGSEGV, '') == ('signal SIGSEGV', '')
    assert outcome(-signal.SIGABRT, 'double free or corruption (!prev)\n') == \
        ('signal SIGABRT', 'double free or corruption (!prev)')
    assert outcome(1, 'Traceback ...\nValueError: x\n') == ('exit 1', 'ValueError: x')
    assert outcome(2, 'note: skipped\nMIMIC.py: error: --ratio 2 (see --help)\n')[0] == 'error'
    assert outcome(2, 'Traceback ...\nerror: x\n')[0] == 'exit 2'  # a traceback is no one-line error
    assert outcome(2, 'something else\n')[0] == 'exit 2'
    unnamed = next(n for n in range(1, 256) if n not in {s.value for s in signal.Signals})
    assert outcome(-unnamed, '') == (f'signal {unnamed}', '')
    assert outcome(None, '') == ('hang', '')


def test_run_names_are_unique_paths():
    run = Run('defence:fp', 'uneven', 8, 2, 'AVX2', 'tensor')
    assert run.name == 'defence:fp/uneven/w8/t2/AVX2/tensor'


def sweep(tmp_path, name, *argv):
    status = sweep_shapes.main([*argv, '--widths', '8', '--isa', 'default', '--augment', 'tensor', '--timeout', '240',
                                '--json', str(tmp_path / f'{name}.json'), '--out', str(tmp_path / f'{name}.md')])
    return status, json.loads((tmp_path / f'{name}.json').read_text())['results']


@pytest.mark.process  # every run of a sweep is a process of its own
def test_a_bounded_sweep_ends_no_run_by_a_signal(tmp_path):
    """Stage 1 at width 8 with two threads on the tensor path (the case that crashed), and a refused input."""
    status, results = sweep(tmp_path, 'crash', '--stages', 'badencoder', '--cases', 'uneven', '--threads', '2')
    assert status == 0 and [r['outcome'] for r in results] == ['finished'], results
    assert '| badencoder | uneven | 8 | 2 | default | tensor | finished |' in (tmp_path / 'crash.md').read_text()
    status, results = sweep(tmp_path, 'refused', '--stages', 'mimic', '--cases', 'batch_gt_set', '--threads', '1')
    assert status == 0 and [r['outcome'] for r in results] == ['error'], results
    assert 'fewer than one batch' in results[0]['detail']


def test_a_logged_sweep_continues_without_running_what_it_holds(tmp_path, monkeypatch):
    done = Run('probe', 'uneven', 4, 1, 'default', '-')
    log = tmp_path / 'sweep.jsonl'
    log.write_text(json.dumps({**done.__dict__, 'outcome': 'finished', 'detail': '', 'seconds': 1.0}) + '\n'
                   + '{"stage": "cut sho\n')  # a line cut short by a kill
    ran = []
    monkeypatch.setattr(sweep_shapes, 'execute', lambda run, work, timeout: ran.append(run) or
                        {**run.__dict__, 'outcome': 'finished', 'detail': '', 'seconds': 2.0})
    todo = Run('probe', 'uneven', 4, 2, 'default', '-')
    results = sweep_shapes.run_all([done, todo], tmp_path, 10, 1, log)
    assert ran == [todo] and [r['seconds'] for r in results] == [1.0, 2.0]
    assert set(sweep_shapes.read_log(log)) == {done.name, todo.name}
