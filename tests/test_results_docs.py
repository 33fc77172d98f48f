"""docs/RESULTS.md holds only tables rendered from the run summaries kept in docs/results/, each as its command
renders it now and each under a provenance line; the links into it and into the experiment log find their
headings."""
from __future__ import annotations

import re

import pytest

from conftest import REPO
from scripts import results_table
from scripts.results.runs import RunError

PAGE = REPO / 'docs' / 'RESULTS.md'
LOG = REPO / 'docs' / 'DEMO_EXPERIMENTS.md'


def test_every_rendered_block_is_as_its_runs_render_it():
    found = results_table.blocks(PAGE.read_text(), PAGE)
    assert len(found) >= 2  # the proportioned study's encoders and defences tables
    assert results_table.check_page(PAGE) == []


def test_results_md_holds_only_rendered_tables_each_under_a_provenance_line():
    lines = PAGE.read_text().split('\n')
    inside = {number for block in results_table.blocks('\n'.join(lines), PAGE)
              for number in range(block.begin, block.end + 1)}
    outside = [line for number, line in enumerate(lines) if line.startswith('|') and number not in inside]
    assert not outside, outside  # a table that is not rendered from kept summaries belongs in DEMO_EXPERIMENTS.md
    for block in results_table.blocks('\n'.join(lines), PAGE):
        heading = max(number for number, line in enumerate(lines[:block.begin]) if line.startswith('#'))
        assert any(line.startswith('*Provenance:*') for line in lines[heading:block.begin]), lines[block.begin]


def changed_digit(text: str) -> str:
    """The page with one digit changed: the last digit of the first data row of its first rendered block."""
    lines = text.split('\n')
    row = results_table.blocks(text, PAGE)[0].begin + 3  # the marker, the header, the alignment row
    digit = max(index for index, char in enumerate(lines[row]) if char.isdigit())
    lines[row] = lines[row][:digit] + str((int(lines[row][digit]) + 1) % 10) + lines[row][digit + 1:]
    return '\n'.join(lines)


def test_a_changed_digit_fails_the_check_and_write_renders_it_again(tmp_path, capsys):
    page = tmp_path / 'RESULTS.md'
    page.write_text(changed_digit(PAGE.read_text()))
    differences = results_table.check_page(page)
    assert len(differences) == 1 and differences[0].count('\n-|') == 1 and differences[0].count('\n+|') == 1
    assert results_table.main(['--check', str(page)]) == 1
    captured = capsys.readouterr()
    assert '--write' in captured.err and captured.out == differences[0]
    assert results_table.main(['--write', str(page)]) == 0
    assert page.read_text() == PAGE.read_text()
    assert results_table.main(['--check', str(page)]) == 0


@pytest.mark.parametrize('page, message', [
    ('<!-- rendered: python -m scripts.results_table docs/results/proportioned/*/seed_* -->\n| a |\n',
     'without <!-- end rendered -->'),
    ('<!-- rendered: python scripts/other.py x -->\n<!-- end rendered -->\n', "must be 'python -m scripts"),
    ('<!-- end rendered -->\n', 'without a block'),
    ('<!-- rendered: python -m scripts.results_table docs/results/none_*/seed_* -->\n<!-- end rendered -->\n',
     'matches no run folder'),
    ('<!-- rendered: python -m scripts.results_table docs/results/proportioned/*/seed_* --out x -->\n'
     '<!-- end rendered -->\n', 'writes no file'),
])
def test_a_block_that_cannot_be_rendered_is_one_line(tmp_path, capsys, page, message):
    path = tmp_path / 'page.md'
    path.write_text(page)
    with pytest.raises(RunError, match=re.escape(message)):
        results_table.check_page(path)
    assert results_table.main(['--check', str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: {path}:')
    assert path.read_text() == page


def anchors(path) -> set[str]:
    """The ids GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens, a repeated
    one numbered -1, -2, ..."""
    found, fenced = set(), False
    for line in path.read_text().split('\n'):
        fenced ^= line.startswith('```')  # a code block's lines are no headings
        match = None if fenced else re.match(r'#{1,6} (.*)', line)
        if match:
            anchor = re.sub(r'[^\w\- ]', '', match[1].strip().lower()).replace(' ', '-')
            repeated = anchor
            for index in range(1, 100):
                if repeated not in found:
                    break
                repeated = f'{anchor}-{index}'
            found.add(repeated)
    return found


def test_links_into_the_results_and_the_experiment_log_find_their_headings():
    targets = {page.name: anchors(page) for page in (PAGE, LOG)}
    pages = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
    checked = 0
    for page in pages:
        for target, anchor in re.findall(r'\]\((?:docs/)?((?:RESULTS|DEMO_EXPERIMENTS)\.md)?#([^)\s]+)\)',
                                         page.read_text()):
            if not target:  # a link within the page
                if page.name not in targets:
                    continue
                target = page.name
            assert anchor in targets[target], (page.name, target, anchor)
            checked += 1
    assert checked > 20
