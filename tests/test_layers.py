"""The package layers have no circles: no module imports, directly or through others, a module that imports it.

Every import statement counts, also one inside a function (such an import hides a circle, it does not remove
it). The layers, bottom up: `common.errors` and `common.files` (no project import), `common.device`, `models`,
`datasets`, `common.distributed`, `common.cli`, the rest of `common`, `attacks` and `defences`, the scripts (and
the entry points kept inside packages, `python -m datasets.prepare` and `python -m datasets.poison`).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

SKIP_FOLDERS = {'tests', '.git', '.ci', 'runs', 'data'}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the repository outside tests/."""
    modules = {}
    for path in sorted(REPO.rglob('*.py')):
        relative = path.relative_to(REPO)
        if relative.parts[0] in SKIP_FOLDERS or any(part.startswith('.') for part in relative.parts):
            continue
        parts = list(relative.with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        modules['.'.join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.') if package else []
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = '.'.join(anchor + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name` the module
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module tail: its module
                target = target.rpartition('.')[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycles_finds_a_circle_and_nothing_else():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_relative_and_function_level_imports_are_found(tmp_path):
    package = tmp_path / 'pkg'
    package.mkdir()
    (package / '__init__.py').write_text('from .low import x\n')
    (package / 'low.py').write_text('x = 1\n')
    (package / 'high.py').write_text('def f():\n    from . import low\n    from pkg.low import x\n    import os\n')
    modules = {'pkg': package / '__init__.py', 'pkg.low': package / 'low.py', 'pkg.high': package / 'high.py'}
    assert imported_modules('pkg.high', modules['pkg.high'], modules) == {'pkg.low'}
    assert imported_modules('pkg', modules['pkg'], modules) == {'pkg.low'}


def test_no_import_cycle():
    modules = project_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert 'common.cli' in graph and 'common.errors' in graph
    assert cycles(graph) == []


@pytest.mark.parametrize('name', ['common.errors', 'common.files'])
def test_the_bottom_layer_imports_no_project_module(name):
    modules = project_modules()
    assert imported_modules(name, modules[name], modules) == set()


def test_every_module_imports():
    for name in project_modules():
        importlib.import_module(name)
