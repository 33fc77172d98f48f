"""NAD (defences/nad.py): its attention terms follow the betas; its run resumes into the student phase."""
from __future__ import annotations

import json

import baseline_defence
from defences import nad
from defence_helpers import tiny_args, views
from defence_helpers import pair  # noqa: F401  (fixtures)


def test_nad_attention_terms_follow_the_betas(pair):
    student, teacher = pair
    x1, _ = views()
    _, _, taps = student(x1, return_taps=True)
    terms = nad.attention_terms(teacher, [0.0, 500.0, 0.0, 1000.0])(x1, None, taps)
    assert set(terms) == {'loss_at2', 'loss_at4'}
    assert [weight for weight, _ in terms.values()] == [500.0, 1000.0]


def test_nad_resumes_into_the_student_phase(data_root, tiny_encoder, tmp_path):
    out = tmp_path / 'nad'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--epochs', 2, '--save_freq', 1, defence='nad'))
    assert (out / 'teacher_1.pth').is_file() and (out / 'teacher_log.csv').is_file()
    assert json.loads((out / 'defence.json').read_text())['teacher_epochs'] == 1
