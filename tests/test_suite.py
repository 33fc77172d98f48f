"""The suite's own rule: every test that starts a process (a script run as a user runs it, torchrun, a shell
script) carries the `process` marker, so that `-m 'not process'` leaves exactly those out."""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

# What a test calls when it starts a process: a new interpreter, torchrun, a shell script. A test that starts one
# through a library function (scripts/investigate/sweep_shapes.py's) is marked by hand and not seen here.
PROCESS_CALLS = ('run_script(', 'subprocess.run(', 'subprocess.check_', 'Popen(', "'bash'")


def starts_processes(sources: dict[str, str]) -> set[str]:
    """Names of the functions (name -> source) that start a process, directly or through another such function."""
    found = {name for name, source in sources.items() if any(call in source for call in PROCESS_CALLS)}
    while True:
        more = {name for name, source in sources.items()
                if name not in found and any(f'{other}(' in source for other in found)}
        if not more:
            return found
        found |= more


def test_a_function_that_calls_one_that_starts_a_process_starts_one():
    sources = {'helper': "    subprocess.run(['x'])", 'test_a': '    helper()', 'test_b': '    x = 1',
               'test_c': '    test_a()'}
    assert starts_processes(sources) == {'helper', 'test_a', 'test_c'}


def load(path: Path):
    """The test module at `path`, imported under its own name (as pytest imports it: its folder on the path, for
    the helpers beside it, also when this test runs alone)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def marked(function) -> bool:
    return any(mark.name == 'process' for mark in getattr(function, 'pytestmark', []))


def test_every_test_that_starts_a_process_carries_the_marker():
    unmarked, checked = [], 0
    for path in sorted(Path(__file__).parent.rglob('test_*.py')):
        if path.stem == Path(__file__).stem:
            continue  # names the calls it looks for, starts none
        module = sys.modules.get(path.stem) or load(path)
        functions = {name: function for name, function in vars(module).items()
                     if inspect.isfunction(function) and function.__module__ == module.__name__}
        for name in starts_processes({name: inspect.getsource(f) for name, f in functions.items()}):
            if name.startswith('test_'):
                checked += 1
                if not marked(functions[name]):
                    unmarked.append(f'{path.name}::{name}')
    assert checked > 30 and not unmarked, unmarked
