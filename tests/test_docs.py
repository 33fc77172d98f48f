"""The README's commands: every flag they give is one the script's --help lists, and the cheap ones run as written."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

SKIPPED = (('git',), ('python', '-m', 'venv'), ('python', '-m', 'pip'), ('python', '-m', 'pytest'))


def readme_commands() -> list[list[str]]:
    """The README's ```bash blocks as commands: continuation lines joined, comments and environment
    assignments (SEEDS=0,1,2 ...) dropped, split as the shell would."""
    text = (REPO / 'README.md').read_text()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            if line.startswith('git '):  # a clone of the repository, its address a placeholder
                continue
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r'[A-Z_]+=\S*', words[0]):
                words.pop(0)
            if words:
                commands.append(words)
    return commands


def target(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(the command that prints the script's help, without --help; the words after the script), or None for
    commands that are not the project's (git, pip, venv, pytest; `&&`-chained setup lines)."""
    if '&&' in words or any(tuple(words[:len(prefix)]) == prefix for prefix in SKIPPED):
        return None
    if words[0] == 'bash':
        return ('bash', words[1]), words[2:]
    if words[0] == 'torchrun':
        index = next(i for i, word in enumerate(words) if word.endswith('.py'))
        return (sys.executable, words[index]), words[index + 1:]
    assert words[0] == 'python', words
    rest = [word for word in words[1:] if word != '-u']
    if rest[0] == '-m':
        return (sys.executable, '-m', rest[1]), rest[2:]
    return (sys.executable, rest[0]), rest[1:]


@functools.lru_cache(maxsize=None)
def help_text(command: tuple[str, ...]) -> str:
    result = subprocess.run([*command, '--help'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (command, result.stderr[-500:])
    return result.stdout


@pytest.mark.process
def test_every_flag_of_the_readmes_commands_is_in_its_scripts_help():
    checked = 0
    for words in readme_commands():
        found = target(words)
        if found is None:
            continue
        command, arguments = found
        text = help_text(command)
        for flag in (word for word in arguments if word.startswith('--')):
            assert re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', text), (' '.join(words), flag)
            checked += 1
    assert checked > 40  # the stage commands, the pipeline and the experiments


@pytest.mark.process
def test_the_readmes_dry_run_runs_as_written():
    words = next(w for w in readme_commands() if w[:3] == ['bash', 'scripts/reproduce_paper.sh', '--dry_run'])
    result = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'train_clean_encoder.py' in result.stdout and 'MIMIC.py' in result.stdout
