"""scripts/repeat_tests.py: a chosen set of tests run N times in a row, each failure named by its test id."""
from __future__ import annotations

from scripts import repeat_tests

SUMMARY = '''\
=========================== short test summary info ============================
FAILED tests/test_distributed.py::test_stage1_two_processes_take_the_single_process_step[drupe] - assert 1 == 0
ERROR tests/test_x.py::test_y - RuntimeError: boom
1 failed, 700 passed, 1 error in 320.01s
'''


def test_failed_ids_are_read_off_pytests_short_summary():
    assert repeat_tests.failed_ids(SUMMARY) == [
        'tests/test_distributed.py::test_stage1_two_processes_take_the_single_process_step[drupe]',
        'tests/test_x.py::test_y']
    assert repeat_tests.failed_ids('3 passed in 0.1s') == []


def test_runs_repeat_and_a_failure_is_named_and_counted(tmp_path, capsys):
    (tmp_path / 'test_flaky.py').write_text(
        'import os\n\n'
        'def test_steady():\n    assert True\n\n'
        'def test_every_other_run():\n'
        f'    marker = {str(tmp_path / "marker")!r}\n'
        '    seen = os.path.exists(marker)\n'
        '    open(marker, "w").close() if not seen else os.remove(marker)\n'
        '    assert not seen\n')
    quiet = ['--pytest_args', f'-p no:xdist -p no:cacheprovider -o addopts=-ra --rootdir {tmp_path}']
    status = repeat_tests.main(['-n', '3', *quiet, str(tmp_path / 'test_flaky.py')])
    out = capsys.readouterr().out
    assert status == 1
    assert 'run 1: passed' in out and 'run 3: passed' in out
    assert 'run 2: FAILED, exit status 1' in out and 'test_flaky.py::test_every_other_run' in out
    assert out.rstrip().splitlines()[-1].startswith('1/3 runs failed')
    assert repeat_tests.main(['-n', '1', '--load', '1', *quiet, f'{tmp_path / "test_flaky.py"}::test_steady']) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith('0/1 runs failed')


def test_bad_counts_are_refused(capsys):
    assert repeat_tests.main(['-n', '0', 'tests']) == 2
    assert 'error: -n must be at least 1' in capsys.readouterr().err
