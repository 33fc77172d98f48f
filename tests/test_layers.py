"""The packages are strict layers, and have no circles.

Every import statement counts, also one inside a function (such an import hides a dependency, it does not remove
it). The layers, bottom to top (docs/DESIGN.md §2.5):

    0  core        errors, atomic files, device, processes, the entry wrapper: no module of another package
    1  models
    2  datasets    also the training data path and the entry points `python -m datasets.prepare` / `.poison`
    3  evaluation
    4  common      the stages' shared flags, runs, engine, distributed training
    5  attacks, defences (neither imports the other)
    6  the stage scripts (a module at the repository root)
    7  the tools: scripts/, reference/, trigger/, docs/ (they may import one another, never a stage script)

A module imports modules of its own package or of lower layers only; no module imports, directly or through
others, a module that imports it.
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


PACKAGE_LAYERS = {'core': 0, 'models': 1, 'datasets': 2, 'evaluation': 3, 'common': 4, 'attacks': 5, 'defences': 5}
STAGE_LAYER = 6  # a module at the repository root: a stage script
TOOLS = ('scripts', 'reference', 'trigger', 'docs')
TOOL_LAYER = 7
# Imports that name one of our modules but load another. scripts/investigate/original_harness.py runs the ORIGINAL
# released code, in a child process of scripts/investigate/compare_original.py: it puts the original's folder first
# on sys.path and imports the original's stage scripts, which share our scripts' names; it imports none of ours.
FOREIGN_IMPORTS = {'scripts.investigate.original_harness': {'MIMIC', 'train_badencoder', 'train_clean_encoder'}}


def layer(name: str) -> tuple[int, str]:
    """(layer, unit) of a module: its package and the package's layer, a stage script (a module at the root) and
    the stage layer, or its tool folder and the tools' layer."""
    top = name.partition('.')[0]
    if top in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[top], top
    if top in TOOLS:
        return TOOL_LAYER, top
    if '.' not in name:
        return STAGE_LAYER, name
    raise ValueError(f'{name}: its package has no layer (add it to PACKAGE_LAYERS, or to TOOLS)')


def layer_violations(graph: dict[str, set[str]], foreign: dict[str, set[str]] | None = None) -> list[str]:
    """One line per import that breaks the layers: a module importing a higher layer, or a sibling of its own layer
    (another package of it, another stage script); a tool importing a stage script. `foreign`: {module: imports
    that load code not ours} (FOREIGN_IMPORTS), left out."""
    found = []
    for name in sorted(graph):
        level, unit = layer(name)
        for target in sorted(graph[name] - (foreign or {}).get(name, set())):
            target_level, target_unit = layer(target)
            if target_unit == unit:
                continue
            if level == TOOL_LAYER:
                if target_level == STAGE_LAYER:
                    found.append(f'{name} imports {target}: a tool imports a stage script')
            elif target_level > level:
                found.append(f'{name} imports {target}: {unit} (layer {level}) is below {target_unit} (layer '
                             f'{target_level})')
            elif target_level == level:
                found.append(f'{name} imports {target}: {unit} and {target_unit} are siblings (layer {level})')
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    modules = project_modules()
    return modules, {name: imported_modules(name, path, modules) for name, path in modules.items()}


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


def test_layer_violations_finds_upward_sibling_and_tool_imports():
    graph = {'models.simclr': {'core.errors', 'common.cli', 'models.resnet'},
             'attacks.ctrl': {'datasets', 'defences.ft', 'attacks.badencoder'},
             'MIMIC': {'defences.mimic', 'train_badencoder'},
             'scripts.benchmark': {'MIMIC', 'trigger.make_trigger', 'scripts.bench_tools', 'common.cli'},
             'scripts.investigate.original_harness': {'MIMIC'}, 'core.cli': {'core.errors'}}
    assert layer_violations(graph, FOREIGN_IMPORTS) == [
        'MIMIC imports train_badencoder: MIMIC and train_badencoder are siblings (layer 6)',
        'attacks.ctrl imports defences.ft: attacks and defences are siblings (layer 5)',
        'models.simclr imports common.cli: models (layer 1) is below common (layer 4)',
        'scripts.benchmark imports MIMIC: a tool imports a stage script']
    assert layer_violations({'scripts.investigate.original_harness': {'MIMIC'}}) == [
        'scripts.investigate.original_harness imports MIMIC: a tool imports a stage script']
    with pytest.raises(ValueError, match='has no layer'):
        layer('newpackage.module')


def test_no_import_cycle():
    modules, graph = import_graph()
    assert 'core.cli' in graph and 'core.errors' in graph
    assert cycles(graph) == []


def test_every_module_has_a_layer():
    modules = project_modules()
    for name, path in modules.items():
        if layer(name)[0] == STAGE_LAYER:
            assert path.parent == REPO and path.name != '__init__.py', f'{name}: a package without a layer'


def test_no_module_imports_a_higher_layer_or_a_sibling():
    modules, graph = import_graph()
    assert layer_violations(graph, FOREIGN_IMPORTS) == []


def test_the_foreign_imports_are_still_there():
    """The allowance for the original's modules names imports the harness still makes, no more."""
    modules, graph = import_graph()
    for name, targets in FOREIGN_IMPORTS.items():
        assert targets <= graph[name], name


def test_core_imports_nothing_outside_core():
    modules, graph = import_graph()
    core = [name for name in graph if layer(name)[1] == 'core']
    assert 'core.cli' in core
    for name in core:
        assert all(layer(target)[1] == 'core' for target in graph[name]), (name, graph[name])


@pytest.mark.parametrize('name', ['core.errors', 'core.files'])
def test_the_bottom_modules_import_no_project_module(name):
    modules = project_modules()
    assert imported_modules(name, modules[name], modules) == set()


def test_every_module_imports():
    for name in project_modules():
        importlib.import_module(name)
