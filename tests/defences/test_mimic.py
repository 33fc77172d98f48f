"""Stage 2, MIMIC.py: frozen teacher, fresh student, MI step, distillation, outputs, errors, resume."""
import csv
import json

import numpy as np
import pytest
import torch

import MIMIC
import defences.mimic
import defences.stage
from core.cli import run_main
from core.errors import UsageError
from models import SimCLR, load_encoder
from models.checkpoint import load_checkpoint
from defences.mimic import distillation_losses
from conftest import run_in_process, run_script
from defence_helpers import SHAPES_NORMALIZATION, images, views
from defence_helpers import pair  # noqa: F401  (a fixture)


def tiny_args(data_root, teacher, results_dir, *extra, ratio=0.25, batch_size=32, mi_epochs=2):
    """256 training images at ratio 0.25: D holds 64 images, two steps of 32 per epoch."""
    return ['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root),
            '--teacher', str(teacher), '--ratio', str(ratio), '--batch_size', str(batch_size),
            '--mi_epochs', str(mi_epochs), '--results_dir', str(results_dir), '--num_workers', '0',
            '--device', 'cpu', '--no_progress', *[str(e) for e in extra]]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CountCalls:
    """Replaces a module's forward with a counting wrapper (no hooks)."""

    def __init__(self, module):
        self.calls, self.kwargs, original = 0, [], module.forward

        def forward(*args, **kwargs):
            self.calls += 1
            self.kwargs.append(kwargs)
            return original(*args, **kwargs)
        module.forward = forward


@pytest.fixture()
def teacher(tiny_encoder):
    args = defences.mimic.get_args_parser().parse_args(['--teacher', str(tiny_encoder)])
    return defences.stage.load_suspect(args, torch.device('cpu'))[0]


def test_parser_keeps_every_original_flag_and_default():
    args = defences.mimic.get_args_parser().parse_args([])
    expected = {'lr': 0.001, 'batch_size': 128, 'epochs': 1000, 'pretraining_dataset': 'cifar10',
                'opt1': 1000, 'opt2': 1000, 'opt3': 1000, 'opt4': 1000, 'opt5': 1, 'knn_t': 0.5,
                'knn_k': 200, 'teacher': '', 'student': '', 'ratio': 0.04, 'results_dir': '', 'seed': 100,
                'gpu': '0', 'mi_model': 'teacher', 'mi_epochs': 200, 'save_freq': 1000, 'subset': 'first'}
    assert {key: getattr(args, key) for key in expected} == expected


def test_teacher_is_frozen_and_student_is_fresh(teacher, tiny_encoder):
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(1)
    student = defences.mimic.build_student(teacher, '', torch.device('cpu'))
    assert student.config == teacher.config == {'arch': 'resnet18', 'width': 8, 'feature_dim': 128}
    assert all(p.requires_grad for p in student.parameters())
    for key, value in teacher.state_dict().items():
        if value.is_floating_point() and 'weight' in key and 'bn' not in key and value.dim() > 1:
            assert not torch.equal(student.state_dict()[key], value), key  # nothing inherited
    from_file = defences.mimic.build_student(teacher, str(tiny_encoder), torch.device('cpu'))
    assert same_state(from_file.state_dict(), teacher.state_dict())  # --student PATH loads the file


def test_student_of_another_architecture_is_refused(teacher, tmp_path):
    from models import save_atomic
    from models.checkpoint import CheckpointError, encoder_checkpoint
    path = tmp_path / 'wide.pth'
    save_atomic(encoder_checkpoint(SimCLR(width=4), None, 1), path)
    with pytest.raises(CheckpointError, match='same architecture'):
        defences.mimic.build_student(teacher, str(path), torch.device('cpu'))


def test_one_teacher_and_two_student_forwards_per_step(teacher):
    torch.manual_seed(0)
    student = SimCLR(width=8)
    counts = {name: CountCalls(module) for name, module in
              {'teacher': teacher, 'student': student, 'teacher_trunk': teacher.f.f[0],
               'student_trunk': student.f.f[0]}.items()}
    batches = [views(8, seed) for seed in range(3)]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    defences.mimic.train_one_epoch(student, teacher, batches, optimizer, [1000.0] * 4, 1.0, 0.5, epoch=1, epochs=1,
                          device=torch.device('cpu'), disable_progress=True)
    steps = len(batches)
    assert counts['teacher'].calls == counts['teacher_trunk'].calls == steps  # no hidden second pass
    assert counts['student'].calls == counts['student_trunk'].calls == 2 * steps
    assert all(kw.get('return_taps') for kw in counts['teacher'].kwargs)
    assert [bool(kw.get('return_taps')) for kw in counts['student'].kwargs] == [True, False] * steps


def test_distillation_leaves_the_teacher_untouched(teacher):
    before = snapshot(teacher)  # parameters and BatchNorm buffers
    torch.manual_seed(0)
    student = SimCLR(width=8)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    student_before = snapshot(student)
    defences.mimic.train_one_epoch(student, teacher, [views(8, seed) for seed in range(2)], optimizer, [1000.0] * 4,
                          1.0, 0.5, epoch=1, epochs=1, device=torch.device('cpu'), disable_progress=True)
    assert same_state(snapshot(teacher), before)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert not same_state(snapshot(student), student_before)  # the student did learn


def test_distillation_loss_falls_on_a_fixed_batch(teacher):
    torch.manual_seed(0)
    student = SimCLR(width=8)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-6)
    x1, x2 = views(16)
    losses = []
    for _ in range(12):
        loss, terms = defences.mimic.distillation_losses(student, teacher, x1, x2, [2000.0, 3000.0, 4000.0, 5000.0],
                                                1.0, 0.5)
        assert set(terms) == {'loss_con', 'loss_at1', 'loss_at2', 'loss_at3', 'loss_at4', 'loss_clone'}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    expected = (terms['loss_con'] + 2000 * terms['loss_at1'] + 3000 * terms['loss_at2']
                + 4000 * terms['loss_at3'] + 5000 * terms['loss_at4'] + terms['loss_clone'])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_tapped_representations_are_cached_in_eval_mode(teacher):
    torch.manual_seed(0)
    student = SimCLR(width=8)  # in train mode, as during distillation
    before = snapshot(student)
    taps, z = defences.mimic.tapped_representations(student, images(20), SHAPES_NORMALIZATION, batch_size=8,
                                           device=torch.device('cpu'), disable_progress=True)
    assert same_state(snapshot(student), before) and student.training  # BN stats untouched, mode restored
    assert [t.shape for t in taps] == [(20, 8 * 32 * 32), (20, 16 * 16 * 16), (20, 32 * 8 * 8), (20, 64 * 4 * 4)]
    assert z.shape == (20, 64) and torch.allclose(z.norm(dim=1), torch.ones(20))
    assert not z.requires_grad and not any(t.requires_grad for t in taps)


def test_mi_step_uses_the_estimates_and_warns_on_fallback(teacher, monkeypatch, capsys):
    estimates = iter([0.1, 0.2, 0.3, 0.4])
    monkeypatch.setattr(defences.mimic, 'estimate_mi', lambda h, z, **kw: (next(estimates), [0.0]))
    report = defences.mimic.locate_benign_knowledge(teacher, images(16), SHAPES_NORMALIZATION, base=[1000] * 4, mi_epochs=1,
                                           batch_size=8, seed=0, device=torch.device('cpu'),
                                           disable_progress=True)
    assert report['mi'] == {'layer3': 0.1, 'layer4': 0.2, 'layer5': 0.3, 'layer6': 0.4}
    assert report['opt'] == pytest.approx([2000, 3000, 4000, 5000]) and not report['fell_back']
    monkeypatch.setattr(defences.mimic, 'estimate_mi', lambda h, z, **kw: (0.0, [0.0]))
    report = defences.mimic.locate_benign_knowledge(teacher, images(16), SHAPES_NORMALIZATION, base=[1000] * 4, mi_epochs=1,
                                           batch_size=8, seed=0, device=torch.device('cpu'),
                                           disable_progress=True)
    defences.mimic.report_weights(report, 'teacher')
    assert report['fell_back'] and report['weights'] == [0.25] * 4
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'warning' in err and 'uniform' in err


def test_clean_subset_first_and_random():
    data = images(100)
    assert np.array_equal(defences.stage.clean_subset(data, 0.3, 'first', 0, 16, 'x'), data[:30])
    random_a = defences.stage.clean_subset(data, 0.3, 'random', 5, 16, 'x')
    random_b = defences.stage.clean_subset(data, 0.3, 'random', 5, 16, 'x')
    assert len(random_a) == 30 and np.array_equal(random_a, random_b)
    assert not np.array_equal(random_a, data[:30])
    # the selection alone: any count, even under one batch (the --mi_data labelled images)
    assert np.array_equal(defences.stage.select_images(data, 3, 'first', 0), data[:3])
    assert np.array_equal(defences.stage.select_images(data, 30, 'random', 5), random_a)
    with pytest.raises(UsageError, match='fewer than one batch of 16'):
        defences.stage.clean_subset(data, 0.1, 'first', 0, 16, 'x')


@pytest.mark.process
def test_script_end_to_end(data_root, tiny_encoder, tmp_path):
    """The README command (lr 1e-2, one epoch) on the synthetic set; the result loads as an encoder."""
    out = tmp_path / 'mimic'
    result = run_script('MIMIC.py', '--lr', '1e-2', '--epochs', '1',
                        *tiny_args(data_root, tiny_encoder, out))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {'args.json', 'mi.json', 'log.csv', 'model1.pth'}
    student, checkpoint = load_encoder(out / 'model1.pth')  # as training_downstream_classifier loads it
    assert student.config == {'arch': 'resnet18', 'width': 8, 'feature_dim': 128}
    assert checkpoint['epoch'] == 1 and {'state_dict', 'optimizer', 'opt', 'rng'} <= set(checkpoint)
    teacher, _ = load_encoder(tiny_encoder)
    assert not same_state(student.state_dict(), teacher.state_dict())
    mi = json.loads((out / 'mi.json').read_text())
    assert mi['mi_model'] == 'teacher' and set(mi['mi']) == {'layer3', 'layer4', 'layer5', 'layer6'}
    assert isinstance(mi['fell_back'], bool) and len(mi['history']['layer3']) == 2
    assert mi['opt'] == pytest.approx(checkpoint['opt'])
    assert sum(mi['weights']) == pytest.approx(1.0)
    with open(out / 'log.csv') as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ['epoch', 'loss', 'loss_con', 'loss_at1', 'loss_at2', 'loss_at3', 'loss_at4',
                             'loss_clone']
    assert len(rows) == 1 and np.isfinite(float(rows[0]['loss']))
    assert json.loads((out / 'args.json').read_text())['lr'] == 0.01
    with pytest.raises(UsageError, match=r'already holds model1\.pth .* --overwrite'):
        MIMIC.main(tiny_args(data_root, tiny_encoder, out, '--epochs', '1'))  # refuses to clobber


def test_too_small_subset_is_one_line_and_writes_nothing(data_root, tiny_encoder, tmp_path):
    out = tmp_path / 'mimic'
    result = run_in_process('MIMIC.py', '--epochs', '1',
                            *tiny_args(data_root, tiny_encoder, out, '--ratio', '0.05'))  # 12 images < 32
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
    assert 'gives 12 of the 256 images' in result.stderr and 'one batch of 32' in result.stderr
    assert not out.exists()


@pytest.mark.parametrize('ratio', ['0', '1.5', '-0.1'])
def test_ratio_outside_unit_interval_is_one_line_exit_2(data_root, tiny_encoder, tmp_path, ratio, capsys):
    out = tmp_path / 'mimic'
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: MIMIC.main(tiny_args(data_root, tiny_encoder, out, '--ratio', ratio)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f'error: --ratio must lie in (0, 1], got {float(ratio)}\n'
    assert not out.exists()


def test_resume_is_bit_identical(data_root, tiny_encoder, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    MIMIC.main(tiny_args(data_root, tiny_encoder, straight, '--epochs', 2, '--save_freq', 1))
    MIMIC.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 1, '--save_freq', 1))
    mi_json = (resumed / 'mi.json').read_text()
    MIMIC.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 2, '--save_freq', 1, '--resume'))
    assert (resumed / 'mi.json').read_text() == mi_json  # the MI step is not repeated
    a, b = load_checkpoint(straight / 'model2.pth'), load_checkpoint(resumed / 'model2.pth')
    assert same_state(a['state_dict'], b['state_dict'])
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a['opt'] == b['opt'] and a['log'] == b['log'] and len(b['log']) == 2
    assert (straight / 'log.csv').read_text() == (resumed / 'log.csv').read_text()
    first = load_checkpoint(resumed / 'model1.pth')
    assert not same_state(first['state_dict'], b['state_dict'])  # epoch 2 did train
    # A resumed run must keep the settings that shape the trajectory.
    with pytest.raises(UsageError, match='--lr 0.001 -> 0.01'):
        MIMIC.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 3, '--resume', '--lr', '1e-2'))


def test_nan_layer_is_recorded_and_warned(monkeypatch, capsys):
    """A non-finite value in one layer's MI estimation is counted per layer, kept in the report (mi.json) and
    warned about in one line; the other layers are not."""
    generator = torch.Generator().manual_seed(0)
    taps = [torch.randn(32, 6, generator=generator) for _ in range(4)]
    taps[2][5, 0] = float('nan')  # layer5: one NaN in the first batch
    z = torch.randn(32, 4, generator=generator)
    monkeypatch.setattr(defences.mimic, 'tapped_representations', lambda *a, **k: (taps, z))
    report = defences.mimic.locate_benign_knowledge(None, images(32), SHAPES_NORMALIZATION, base=[1000] * 4, mi_epochs=2,
                                           batch_size=16, seed=0, device=torch.device('cpu'), disable_progress=True)
    assert report['nonfinite'] == {'layer3': 0, 'layer4': 0, 'layer5': 4, 'layer6': 0}
    assert report['nonfinite_losses'] == {'layer3': 0, 'layer4': 0, 'layer5': 4, 'layer6': 0}
    json.dumps(report)
    defences.mimic.report_weights(report, 'teacher')
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('warning: MI of layer5: 4 batch'), err
    defences.mimic.report_weights(defences.mimic.uniform_layer_weights([1000] * 4), 'teacher')
    assert capsys.readouterr().err == ''


@pytest.fixture()
def stl10_root(tmp_path):
    """A stand-in STL10: 128 unlabeled images for D and 40 labelled training images, told apart by their pixels."""
    from conftest import write_split
    unlabeled = images(128, seed=1)
    labelled = images(40, seed=2)
    write_split(tmp_path / 'stl10', 'train_unlabeled', unlabeled, None)
    write_split(tmp_path / 'stl10', 'train', labelled, np.arange(40) % 10)
    return tmp_path, unlabeled, labelled


def test_mi_data_subset_or_the_released_labelled_split(stl10_root, data_root):
    """--mi_data labelled: STL10's first ratio·N labelled images (the released code), fewer than a batch
    accepted; subset, and any set whose labelled split is its pre-training split: D itself."""
    from argparse import Namespace
    root, unlabeled, labelled = stl10_root
    args = Namespace(pretraining_dataset='stl10', data_root=str(root), data_dir=None, ratio=0.25, subset='first',
                     seed=0, batch_size=16, mi_data='subset')
    info, clean = defences.stage.load_clean_subset(args)
    assert np.array_equal(clean, unlabeled[:32])
    chosen, source = defences.mimic.load_mi_images(args, info, clean)
    assert chosen is clean and source == 'stl10/train_unlabeled'
    args.mi_data = 'labelled'
    chosen, source = defences.mimic.load_mi_images(args, info, clean)
    assert np.array_equal(chosen, labelled[:10]) and source == 'stl10/train'  # 10 < one batch of 16
    args.ratio = 0.02  # 0 of 40 labelled images
    with pytest.raises(UsageError, match=r'--mi_data labelled: --ratio 0.02 gives 0 of the 40 images of stl10/train'):
        defences.mimic.load_mi_images(args, info, clean)
    shapes = Namespace(pretraining_dataset='synthetic_shapes', data_root=str(data_root), data_dir=None, ratio=0.25,
                       subset='first', seed=0, batch_size=16, mi_data='labelled')
    info, clean = defences.stage.load_clean_subset(shapes)
    assert defences.mimic.load_mi_images(shapes, info, clean) == (clean, 'synthetic_shapes/train')


def test_mi_data_labelled_through_the_script(stl10_root, tiny_encoder, tmp_path, monkeypatch):
    """The MI step sees the labelled images and mi.json says so; the student is still distilled on D."""
    root, unlabeled, labelled = stl10_root
    seen = []
    measure = defences.mimic.locate_benign_knowledge
    monkeypatch.setattr(defences.mimic, 'locate_benign_knowledge',
                        lambda model, images, *a, **k: seen.append(images) or measure(model, images, *a, **k))
    out = tmp_path / 'mimic'
    argv = ['--pretraining_dataset', 'stl10', '--data_root', str(root), '--teacher', str(tiny_encoder),
            '--ratio', '0.25', '--batch_size', '16', '--mi_epochs', '1', '--epochs', '1', '--results_dir', str(out),
            '--num_workers', '0', '--device', 'cpu', '--no_progress', '--mi_data', 'labelled']
    MIMIC.main(argv)
    assert len(seen) == 1 and np.array_equal(seen[0], labelled[:10])
    mi = json.loads((out / 'mi.json').read_text())
    assert mi['mi_data'] == {'source': 'stl10/train', 'images': 10}
    assert load_checkpoint(out / 'model1.pth')['log'][0]['epoch'] == 1  # 32 images of D: two steps of 16


def test_resume_of_a_checkpoint_written_before_the_ablation_flags(data_root, tiny_encoder, tmp_path):
    """Recorded arguments without --layer_weights/--no_*/--mi_data ran with their defaults: it resumes."""
    from models import save_atomic
    out = tmp_path / 'mimic'
    MIMIC.main(tiny_args(data_root, tiny_encoder, out, '--epochs', 1, '--save_freq', 1))
    checkpoint = load_checkpoint(out / 'model1.pth')
    for flag in ('layer_weights', 'no_attention', 'no_clone', 'no_contrastive', 'mi_data'):
        del checkpoint['args'][flag]
    save_atomic(checkpoint, out / 'model1.pth')
    MIMIC.main(tiny_args(data_root, tiny_encoder, out, '--epochs', 2, '--save_freq', 1, '--resume'))
    assert load_checkpoint(out / 'model2.pth')['epoch'] == 2
    with pytest.raises(UsageError, match="--mi_data 'subset' -> 'labelled'"):
        MIMIC.main(tiny_args(data_root, tiny_encoder, out, '--epochs', 3, '--resume', '--mi_data', 'labelled'))


# ------------------------------------------------------------------------------------- the ablations

OPT = [2000.0, 3000.0, 4000.0, 5000.0]


def weighted(terms, opt=OPT, opt5=1.0, con=1.0):
    value = con * terms.get('loss_con', 0) + opt5 * terms.get('loss_clone', 0)
    return value + sum(w * terms.get(f'loss_at{i}', 0) for i, w in enumerate(opt, start=1))


@pytest.mark.parametrize('ablation', ['none', 'no_attention', 'no_clone', 'no_contrastive'])
def test_each_ablation_drops_exactly_its_terms(pair, ablation):
    student, teacher = pair
    x1, x2 = views(8)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    _, full = distillation_losses(student, teacher, x1, x2, OPT, 1.0, 0.5)
    student.load_state_dict(state)  # the same BatchNorm statistics for the ablated pass
    opt = [0.0] * 4 if ablation == 'no_attention' else OPT
    opt5 = 0.0 if ablation == 'no_clone' else 1.0
    con = 0.0 if ablation == 'no_contrastive' else 1.0
    loss, terms = distillation_losses(student, teacher, x1, x2, opt, opt5, 0.5, contrastive_weight=con)
    dropped = {'none': set(), 'no_attention': {f'loss_at{i}' for i in range(1, 5)}, 'no_clone': {'loss_clone'},
               'no_contrastive': {'loss_con'}}[ablation]
    assert set(terms) == set(full) - dropped
    for key in terms:  # the terms that stay are the same numbers
        assert torch.allclose(terms[key], full[key], rtol=1e-5, atol=1e-7), key
    assert loss.item() == pytest.approx(weighted(terms, opt, opt5, con).item(), rel=1e-6)


def test_without_contrastive_the_second_view_is_not_encoded(pair):
    student, teacher = pair
    calls = []
    original = student.forward
    student.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    distillation_losses(student, teacher, *views(8), OPT, 1.0, 0.5, contrastive_weight=0.0)
    assert len(calls) == 1


def test_every_term_off_is_refused(pair):
    student, teacher = pair
    with pytest.raises(UsageError, match='every loss term'):
        distillation_losses(student, teacher, *views(8), [0.0] * 4, 0.0, 0.5, contrastive_weight=0.0)


def test_uniform_layer_weights_skip_the_mi_step(data_root, tiny_encoder, tmp_path, monkeypatch):
    def no_mi(*args, **kwargs):
        raise AssertionError('the MI step ran')
    monkeypatch.setattr(defences.mimic, 'estimate_mi', no_mi)
    out = tmp_path / 'uniform'
    MIMIC.main(['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root), '--teacher',
                str(tiny_encoder), '--ratio', '0.25', '--batch_size', '32', '--epochs', '1', '--results_dir', str(out),
                '--num_workers', '0', '--device', 'cpu', '--no_progress', '--layer_weights', 'uniform'])
    mi = json.loads((out / 'mi.json').read_text())
    assert mi['layer_weights'] == 'uniform' and mi['mi'] is None
    assert mi['weights'] == [0.25] * 4 and mi['opt'] == [3500.0] * 4
    assert load_checkpoint(out / 'model1.pth')['opt'] == [3500.0] * 4


def test_mimic_rejects_every_term_off(data_root, tiny_encoder, tmp_path):
    with pytest.raises(UsageError, match='no loss'):
        MIMIC.main(['--teacher', str(tiny_encoder), '--results_dir', str(tmp_path / 'x'), '--no_attention',
                    '--no_clone', '--no_contrastive'])
