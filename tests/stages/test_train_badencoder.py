"""Stage 1, train_badencoder.py: flags, the README's form, the attack's effect, frozen parts, bad input, resume."""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_badencoder
from attacks import badencoder, drupe
from common.runs import read_csv
from core.errors import NonFiniteLossError, UsageError
from datasets import (DataError, Reference, ShadowImages, finetune_transform, get_info, load_reference,
                      load_trigger, normalize_batch, triggered_copy)
from datasets import test_transform as eval_transform
from evaluation.features import encode_images
from models import load_checkpoint, load_encoder
from conftest import run_in_process, run_script

NORMALIZATION = get_info('synthetic_shapes').normalization


def attack_args(data_root, trigger_file, reference_file, encoder, results_dir, *extra: str) -> list[str]:
    """A tiny run on the synthetic sets: shadow synthetic_shapes (256 images), target synthetic_digits."""
    return ['--data_root', str(data_root), '--pretraining_dataset', 'synthetic_shapes',
            '--shadow_dataset', 'synthetic_shapes', '--encoder_usage_info', 'synthetic_shapes',
            '--downstreamTask', 'synthetic_digits', '--trigger_file', str(trigger_file),
            '--reference_file', str(reference_file), '--pretrained_encoder', str(encoder),
            '--results_dir', str(results_dir), '--batch_size', '32', '--num_workers', '0', '--no_progress',
            '--device', 'cpu', *extra]


def similarities(encoder_path, data_root, trigger_file, reference_file) -> dict[str, float]:
    """Mean cos(f(x ⊕ t), f(r)) over held-out images, raw and centred on the clean features' mean.

    A randomly initialised encoder maps every input to nearly the same direction (raw cosines ~0.98),
    so the centred cosine, and its gap to clean images, shows where the trigger moves inputs.
    """
    model, _ = load_encoder(encoder_path)
    with np.load(data_root / 'synthetic_shapes' / 'test.npz') as data:
        images = data['x']
    trigger, reference = load_trigger(trigger_file), load_reference(reference_file)
    def encode(x):
        return encode_images(model.f, x, NORMALIZATION, torch.device('cpu'), disable_progress=True)

    clean, triggered, ref = encode(images), encode(triggered_copy(images, trigger)), encode(reference.x)
    centre = clean.mean(dim=0)
    centred_ref = F.normalize(ref - centre, dim=1)
    return {'raw': (triggered @ ref.t()).mean().item(),
            'centred_triggered': (F.normalize(triggered - centre, dim=1) @ centred_ref.t()).mean().item(),
            'centred_clean': (F.normalize(clean - centre, dim=1) @ centred_ref.t()).mean().item()}


def test_flags_and_defaults_of_the_original():
    args = train_badencoder.get_args_parser().parse_args([])
    expected = {'batch_size': 256, 'lr': 0.001, 'lambda1': 1.0, 'lambda2': 1.0, 'epochs': 200,
                'reference_file': '', 'trigger_file': '', 'pretraining_dataset': 'cifar10',
                'shadow_dataset': 'cifar10', 'downstreamTask': 'cifar10', 'pretrained_encoder': '',
                'encoder_usage_info': 'cifar10', 'results_dir': '', 'seed': 100, 'gpu': '0',
                'knn_k': 200, 'knn_t': 0.5, 'save_freq': 20, 'device': 'auto'}
    assert {key: getattr(args, key) for key in expected} == expected
    # The flags added with --attack default to plain BadEncoder: every reference, the whole shadow set.
    assert train_badencoder.parse_args([]) == args
    assert (args.attack, args.shadow_fraction, args.num_references) == ('badencoder', 1.0, None)
    assert all(getattr(args, flag) is None for flag in drupe.FLAGS)
    parser = train_badencoder.get_args_parser()
    assert parser.parse_args(['--knn-k', '7', '--knn-t', '0.1']).knn_k == 7
    for flag, name in [('--shadow_dataset', 'synthetic_shapes'), ('--downstreamTask', 'synthetic_digits'),
                       ('--downstreamTask', 'gtsrb'), ('--encoder_usage_info', 'stl10')]:
        assert getattr(parser.parse_args([flag, name]), flag[2:]) == name
    with pytest.raises(SystemExit):  # unknown dataset names are refused by argparse
        parser.parse_args(['--shadow_dataset', 'imagenet'])
    with pytest.raises(SystemExit):  # the normalisation must come from a pre-training set
        parser.parse_args(['--encoder_usage_info', 'gtsrb'])


def test_readme_typo_value_is_taken(tmp_path, monkeypatch, capsys):
    parser = train_badencoder.get_args_parser()
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'clean.pth').write_bytes(b'')
    fixed = badencoder.fix_readme_typo(['--pretrained_encoder', '--clean.pth', '--epochs', '3'], parser)
    assert parser.parse_args(fixed).pretrained_encoder == 'clean.pth'
    assert 'note:' in capsys.readouterr().err
    (tmp_path / '--odd.pth').write_bytes(b'')  # a file really named with '--' keeps its name
    fixed = badencoder.fix_readme_typo(['--pretrained_encoder', '--odd.pth'], parser)
    assert parser.parse_args(fixed).pretrained_encoder == '--odd.pth'
    # A real option after the flag is left for argparse to report (a missing value).
    assert badencoder.fix_readme_typo(['--pretrained_encoder', '--epochs', '3'], parser) == \
        ['--pretrained_encoder', '--epochs', '3']


def test_device_batch_matches_shadow_images(data_root):
    """The step builds clean and triggered inputs on the device; they equal ShadowImages' test transform."""
    with np.load(data_root / 'synthetic_shapes' / 'train.npz') as data:
        images = data['x'][:5]
    patches = np.zeros((2, 32, 32, 3))
    masks = np.ones((2, 32, 32, 3), dtype=np.int64)
    patches[0, :4, :4], masks[0, :4, :4] = 255, 0
    patches[1, -6:, -6:], masks[1, -6:, -6:] = 128, 0
    path = data_root.parent / 'two_patches.npz'
    np.savez(path, t=patches, tm=masks)
    trigger = load_trigger(path, 32)
    reference = Reference(images[:2], np.array([1, 1]))
    shadow = ShadowImages(images, trigger, reference, eval_transform(NORMALIZATION),
                          finetune_transform(NORMALIZATION))
    batch = torch.from_numpy(images)
    clean = normalize_batch(batch, NORMALIZATION)
    triggered = badencoder.triggered_inputs(batch, trigger, 2, shadow.trigger_index, NORMALIZATION)
    for index in range(len(images)):
        expected_clean, expected_triggered, _ = shadow[index]
        torch.testing.assert_close(clean[index], expected_clean, atol=1e-6, rtol=0)
        for i in range(2):  # i-major: copy i of image b sits at i * B + b
            torch.testing.assert_close(triggered[i * len(images) + index], expected_triggered[i],
                                       atol=1e-6, rtol=0)


def test_stl10_shadow_set_is_the_first_unlabeled_images(tmp_path, monkeypatch):
    """More unlabeled images than SHADOW_SIZE: the first SHADOW_SIZE of them, as the released code, whatever --seed
    is."""
    images = np.random.default_rng(0).integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)
    (tmp_path / 'stl10').mkdir()
    np.savez(tmp_path / 'stl10' / 'train_unlabeled.npz', x=images)
    monkeypatch.setattr(badencoder, 'SHADOW_SIZE', 100)
    parser = train_badencoder.get_args_parser()
    subsets = [badencoder.load_shadow_images(parser.parse_args(
        ['--shadow_dataset', 'stl10', '--data_root', str(tmp_path), '--batch_size', '8', '--seed', seed]))
        for seed in ('1', '2')]
    assert subsets[0].shape == (100, 32, 32, 3) and np.array_equal(subsets[0], subsets[1])
    assert np.array_equal(subsets[0], images[:100])
    with pytest.raises(UsageError, match='--batch_size'):
        badencoder.load_shadow_images(parser.parse_args(
            ['--shadow_dataset', 'stl10', '--data_root', str(tmp_path), '--batch_size', '101']))


def test_freeze_batchnorm_after_train():
    from models import SimCLR
    model = SimCLR(width=8)
    model.f.train()
    badencoder.freeze_batchnorm(model.f)
    norms = [m for m in model.f.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad
                         for m in norms)
    assert model.f.f[0].weight.requires_grad and model.f.training


@pytest.mark.process
def test_end_to_end_plants_the_backdoor(tmp_path, data_root, trigger_file, reference_file, tiny_encoder):
    results = tmp_path / 'run'
    result = run_script('train_badencoder.py', *attack_args(data_root, trigger_file, reference_file, tiny_encoder,
                                                            results, '--epochs', '2', '--save_freq', '1',
                                                            '--lr', '0.05'))
    assert result.returncode == 0, result.stderr
    assert (results / 'model_1.pth').is_file() and (results / 'model_2.pth').is_file()
    assert json.loads((results / 'args.json').read_text())['lr'] == 0.05
    with open(results / 'log.csv', newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert [row['epoch'] for row in rows] == ['0', '1', '2']  # the monitor also runs before training
    assert list(rows[0]) == ['epoch', 'loss', 'loss0', 'loss1', 'loss2', 'knn_acc', 'knn_asr']
    for row in rows[1:]:
        terms = {name: float(row[name]) for name in ('loss', 'loss0', 'loss1', 'loss2')}
        assert terms['loss'] == pytest.approx(terms['loss0'] + terms['loss1'] + terms['loss2'], abs=1e-5)
        assert all(-1 <= terms[name] <= 1 for name in ('loss0', 'loss1', 'loss2'))
        assert 0 <= float(row['knn_acc']) <= 100 and 0 <= float(row['knn_asr']) <= 100

    checkpoint = load_checkpoint(results / 'model_2.pth')
    assert checkpoint['epoch'] == 2 and checkpoint['optimizer'] and checkpoint['target_label'] == 1
    assert (checkpoint['arch'], checkpoint['width']) == ('resnet18', 8)

    # Only the weights of f's convolutions moved: BatchNorm statistics and affine parameters, and g, did not.
    before = load_checkpoint(tiny_encoder)['state_dict']
    after = checkpoint['state_dict']
    assert set(before) == set(after)
    frozen = [key for key in before if key.startswith('g.') or '.bn' in key or key.startswith('f.f.1.')
              or '.downsample.1.' in key]
    assert len(frozen) > 40
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before['f.f.0.weight'], after['f.f.0.weight'])

    # The backdoor: triggered held-out images move towards the reference, clean ones much less.
    old = similarities(tiny_encoder, data_root, trigger_file, reference_file)
    new = similarities(results / 'model_2.pth', data_root, trigger_file, reference_file)
    assert 1 - new['raw'] < 0.5 * (1 - old['raw'])
    old_gap = old['centred_triggered'] - old['centred_clean']
    new_gap = new['centred_triggered'] - new['centred_clean']
    assert new_gap > old_gap + 0.01


def test_readme_command_with_typo_and_unprepared_monitor(tmp_path, data_root, trigger_file, reference_file,
                                                         tiny_encoder):
    """The original README's form: `--pretrained_encoder --PATH` and a --downstreamTask (gtsrb) not prepared."""
    results = tmp_path / 'run'
    args = attack_args(data_root, trigger_file, reference_file, '--' + str(tiny_encoder), results,
                       '--epochs', '1', '--batch_size', '128')
    args[args.index('synthetic_digits')] = 'gtsrb'
    result = run_in_process('train_badencoder.py', *args)
    assert result.returncode == 0, result.stderr
    assert (results / 'model_1.pth').is_file()
    assert 'after --pretrained_encoder' in result.stderr
    assert result.stderr.count('gtsrb is not prepared') == 1
    assert json.loads((results / 'args.json').read_text())['pretrained_encoder'] == str(tiny_encoder)
    with open(results / 'log.csv', newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert [row['epoch'] for row in rows] == ['1'] and rows[0]['knn_acc'] == ''


def assert_one_line_error(result, results_dir, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not results_dir.exists(), 'bad input must leave nothing behind'


def test_trigger_of_another_image_size(tmp_path, data_root, reference_file, tiny_encoder):
    trigger = tmp_path / 'small_trigger.npz'
    np.savez(trigger, t=np.zeros((1, 16, 16, 3)), tm=np.ones((1, 16, 16, 3), dtype=np.int64))
    results = tmp_path / 'run'
    result = run_in_process('train_badencoder.py', *attack_args(data_root, trigger, reference_file, tiny_encoder,
                                                                results, '--epochs', '1'))
    assert_one_line_error(result, results, str(trigger), '16x16', '32x32')


def test_reference_label_outside_the_downstream_classes(tmp_path, data_root, trigger_file, tiny_encoder):
    reference = tmp_path / 'bad_reference.npz'
    with np.load(data_root / 'synthetic_digits' / 'train.npz') as data:
        np.savez(reference, x=data['x'][:1], y=np.array([10], dtype=np.int64))  # synthetic_digits has 0..9
    results = tmp_path / 'run'
    result = run_in_process('train_badencoder.py', *attack_args(data_root, trigger_file, reference, tiny_encoder,
                                                                results, '--epochs', '1'))
    assert_one_line_error(result, results, str(reference), '10', '0..9')


def test_resume_matches_an_uninterrupted_run(tmp_path, data_root, trigger_file, reference_file, tiny_encoder):
    def run(results, *extra):
        args = attack_args(data_root, trigger_file, reference_file, tiny_encoder, results, '--batch_size', '64',
                           '--save_freq', '1', *extra)
        args[args.index('synthetic_digits')] = 'gtsrb'  # no monitor: faster
        train_badencoder.main(args)

    run(tmp_path / 'straight', '--epochs', '2')
    run(tmp_path / 'killed', '--epochs', '1')
    with pytest.raises(UsageError, match='--overwrite'):  # an earlier run's checkpoints are not clobbered
        run(tmp_path / 'killed', '--epochs', '2')
    run(tmp_path / 'killed', '--epochs', '2', '--resume')
    straight = load_checkpoint(tmp_path / 'straight' / 'model_2.pth')['state_dict']
    resumed = load_checkpoint(tmp_path / 'killed' / 'model_2.pth')['state_dict']
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    logs = [(tmp_path / name / 'log.csv').read_text() for name in ('straight', 'killed')]
    assert logs[0] == logs[1]


def test_non_finite_loss_stops_without_a_checkpoint(tmp_path, data_root, trigger_file, reference_file,
                                                    tiny_encoder):
    results = tmp_path / 'run'
    args = attack_args(data_root, trigger_file, reference_file, tiny_encoder, results, '--epochs', '1',
                       '--lambda1', 'nan')
    args[args.index('synthetic_digits')] = 'gtsrb'
    with pytest.raises(NonFiniteLossError, match='epoch 1, step 1'):
        train_badencoder.main(args)
    assert not list(results.glob('*.pth'))


# ---------------------------------------------------------------------------------------------- DRUPE

def test_drupe_values_fill_only_the_flags_not_given():
    args = train_badencoder.parse_args(['--attack', 'drupe', '--lr', '0.01', '--drupe_cost_dist', '0.5'])
    assert (args.lr, args.drupe_cost_dist) == (0.01, 0.5)  # given: kept
    assert (args.epochs, args.batch_size, args.shadow_fraction, args.num_references) == (120, 256, 0.2, 3)
    assert (args.lambda1, args.lambda2, args.drupe_projections, args.drupe_output) == (1.0, 1.0, 50, 'best')
    assert drupe.schedule_from_args(args) == replace(drupe.Schedule(), cost_dist=0.5)
    assert train_badencoder.parse_args(['--attack', 'drupe', '--epochs', '200']).epochs == 200  # a default value

    def refused(*argv: str) -> str:
        with pytest.raises(UsageError) as error:
            train_badencoder.check_args(train_badencoder.parse_args(
                ['--pretrained_encoder', 'e', '--trigger_file', 't', '--reference_file', 'r', *argv]))
        return str(error.value)
    assert '--drupe_cost_spread' in refused('--drupe_cost_spread', '0.2')  # BadEncoder has no such cost
    assert 'at least 2 references' in refused('--attack', 'drupe', '--num_references', '1')
    assert '--shadow_fraction' in refused('--shadow_fraction', '0')
    assert '--drupe_projections' in refused('--attack', 'drupe', '--drupe_projections', '0')


def test_drupe_end_to_end(tmp_path, data_root, trigger_file, three_references, tiny_encoder):
    """Two epochs (warm-up, then the preserve phase) on DRUPE's 20% shadow set: 51 images, one batch of 32."""
    results = tmp_path / 'run'
    result = run_in_process('train_badencoder.py', *attack_args(data_root, trigger_file, three_references, tiny_encoder,
                                                                results, '--attack', 'drupe', '--epochs', '2',
                                                                '--drupe_preserve_from', '2'))
    assert result.returncode == 0, result.stderr
    assert 'shadow set: 51 images' in result.stdout
    assert 'DRUPE output: the last epoch, 2 (no epoch > 24 met its targets)' in result.stdout
    recorded = json.loads((results / 'args.json').read_text())
    assert {key: recorded[key] for key in ('attack', 'lr', 'epochs', 'batch_size', 'shadow_fraction',
                                           'num_references', 'drupe_preserve_from', 'drupe_cost_spread')} == \
        {'attack': 'drupe', 'lr': 0.05, 'epochs': 2, 'batch_size': 32, 'shadow_fraction': 0.2,
         'num_references': 3, 'drupe_preserve_from': 2, 'drupe_cost_spread': 0.1}

    with open(results / 'log.csv', newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert [row['epoch'] for row in rows] == ['0', '1', '2']
    assert list(rows[0]) == ['epoch', 'loss', 'loss0', 'loss1', 'loss2', 'spread_std', 'trigger_sim',
                             'reference_sim', 'swd', 'swd_rel', 'cost_spread', 'cost_dist', 'knn_acc', 'knn_asr']
    # One step per epoch, so each row's loss is its terms weighted as DRUPE weighs them in that phase.
    for row, phase in zip(rows[1:], ('warmup', 'preserve')):
        terms = {name: float(row[name]) for name in ('loss0', 'loss1', 'loss2', *drupe.TERMS)}
        assert terms['swd'] > 0 and terms['swd_rel'] > 0 and 0 <= terms['spread_std'] <= 2
        assert (float(row['cost_spread']), float(row['cost_dist'])) == (0.1, 0.001)
        weights = drupe.term_weights(phase, 0.1, 0.001, terms['spread_std'], terms['reference_sim'], 1.0, 1.0,
                                     drupe.Schedule())
        assert float(row['loss']) == pytest.approx(sum(w * terms[name] for name, w in weights.items()), abs=1e-5)
    assert weights['swd_rel'] == 0.001 and weights['loss0'] == 1.0  # the last row was in the preserve phase

    model, checkpoint = load_encoder(results / 'model_2.pth')
    assert checkpoint['epoch'] == 2 and checkpoint['selected_epoch'] == 2 and checkpoint['target_label'] == 1
    assert checkpoint['drupe_state']['cost_spread'] == 0.1 and 'last_state_dict' not in checkpoint
    assert not torch.equal(load_checkpoint(tiny_encoder)['state_dict']['f.f.0.weight'], model.f.f[0].weight)
    assert not (results / 'best.pth').exists()


def test_drupe_too_few_references(tmp_path, data_root, trigger_file, reference_file, tiny_encoder):
    results = tmp_path / 'run'
    with pytest.raises(DataError, match='holds 1 reference'):
        train_badencoder.main(attack_args(data_root, trigger_file, reference_file, tiny_encoder, results,
                                          '--attack', 'drupe'))
    assert not results.exists()


def test_drupe_output_is_the_selected_epoch_and_resume_matches(tmp_path, monkeypatch, data_root, trigger_file,
                                                               three_references, tiny_encoder):
    """Targets any epoch meets (the tiny encoder never spreads its triggered inputs to DRUPE's 0.6): every epoch
    after the warm-up is a candidate, the output is the one with the smallest swd, and a resumed run ends the same."""
    schedule = drupe.schedule_from_args
    monkeypatch.setattr(drupe, 'schedule_from_args', lambda args: replace(
        schedule(args), effect_target=1.0, utility_target=1.0, trigger_sim_target=2.0))

    def run(results, *extra):
        args = attack_args(data_root, trigger_file, three_references, tiny_encoder, results, '--attack', 'drupe',
                           '--shadow_fraction', '0.5', '--save_freq', '1', '--drupe_preserve_from', '2',
                           '--drupe_adapt_after', '1', '--drupe_select_after', '1', *extra)
        args[args.index('synthetic_digits')] = 'gtsrb'  # no monitor: faster
        train_badencoder.main(args)

    run(tmp_path / 'straight', '--epochs', '3')
    rows = read_csv(tmp_path / 'straight' / 'log.csv')
    swd = {int(row['epoch']): float(row['swd']) for row in rows}
    best = min((2, 3), key=swd.get)  # epoch 1 is the warm-up
    assert [float(row['cost_spread']) for row in rows] == pytest.approx([0.1, 0.1, 0.125])  # on target after 2
    output = load_checkpoint(tmp_path / 'straight' / 'model_3.pth')
    selected = load_checkpoint(tmp_path / 'straight' / 'best.pth')
    assert output['selected_epoch'] == selected['epoch'] == best
    assert output['drupe_state']['best_epoch'] == best and output['drupe_state']['best_swd'] == swd[best]
    for key, value in load_checkpoint(tmp_path / 'straight' / f'model_{best}.pth')['state_dict'].items():
        assert torch.equal(output['state_dict'][key], value) and torch.equal(selected['state_dict'][key], value)
    assert ('last_state_dict' in output) == (best != 3)

    run(tmp_path / 'killed', '--epochs', '2')
    with pytest.raises(UsageError, match='drupe_cost_dist'):  # DRUPE's flags must match too
        run(tmp_path / 'killed', '--epochs', '3', '--resume', '--drupe_cost_dist', '0.01')
    run(tmp_path / 'killed', '--epochs', '3', '--resume')
    resumed = load_checkpoint(tmp_path / 'killed' / 'model_3.pth')
    assert resumed['selected_epoch'] == best and resumed['drupe_state'] == output['drupe_state']
    for name in ('state_dict', 'last_state_dict'):
        for key, value in output.get(name, {}).items():
            assert torch.equal(resumed[name][key], value), (name, key)
    logs = [(tmp_path / name / 'log.csv').read_text() for name in ('straight', 'killed')]
    assert logs[0] == logs[1]


def test_checkpoint_from_before_attack_flags_resumes_as_badencoder(tmp_path, data_root, trigger_file,
                                                                   three_references, tiny_encoder):
    results = tmp_path / 'run'
    args = attack_args(data_root, trigger_file, three_references, tiny_encoder, results, '--epochs', '1')
    args[args.index('synthetic_digits')] = 'gtsrb'
    train_badencoder.main(args)
    path = results / 'model_1.pth'
    checkpoint = load_checkpoint(path)
    for flag in ('attack', 'shadow_fraction', 'num_references', *drupe.FLAGS):  # before --attack existed
        del checkpoint['args'][flag]
    torch.save(checkpoint, path)
    train_badencoder.main([*args, '--resume'])  # accepted: nothing left to do
    with pytest.raises(UsageError, match="--attack 'badencoder' -> 'drupe'"):
        train_badencoder.main([*args, '--resume', '--attack', 'drupe'])
