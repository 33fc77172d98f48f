"""defences/ and baseline_defence.py: FP's pieces, NAD's and KD's terms, MIMIC's ablations, every baseline end to
end on tiny data, resume, errors."""
import json

import numpy as np
import pytest
import torch

import baseline_defence
import MIMIC
import defences.mimic
from core.errors import UsageError
from defences import BASELINES, fp, nad
from defences.mimic import distillation_losses
from models import SimCLR, load_encoder
from models.checkpoint import load_checkpoint
from conftest import run_in_process, run_script

NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def tiny_args(data_root, teacher, results_dir, *extra, defence='ft'):
    """256 training images at ratio 0.25: D holds 64 images, two steps of 32 per epoch."""
    return ['--defence', defence, '--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root),
            '--teacher', str(teacher), '--ratio', '0.25', '--batch_size', '32', '--epochs', '1',
            '--results_dir', str(results_dir), '--num_workers', '0', '--device', 'cpu', '--no_progress',
            *[str(e) for e in extra]]


def images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def views(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randn(n, 3, 32, 32, generator=generator)


# ------------------------------------------------------------------------------------------ Fine-Pruning

def test_least_active_channels_are_exactly_the_lowest_ones():
    activation = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 2.0, 0.0, 0.7, 0.2, 1.0])
    mask = fp.least_active_channels(activation, 0.3)  # 3 of 10: 0.0 (6), then the tie 0.1 at 1 and 3
    assert mask.tolist() == [False, True, False, True, False, False, True, False, False, False]
    assert not fp.least_active_channels(activation, 0.0).any()


def test_mean_channel_activation_is_the_mean_of_the_last_stage():
    torch.manual_seed(0)
    model = SimCLR(width=8).eval()
    data = images(10)
    activation = fp.mean_channel_activation(model, data, NORMALIZATION, torch.device('cpu'), batch_size=4)
    from datasets import normalize_batch
    with torch.no_grad():
        _, taps = model.f.forward_with_taps(normalize_batch(data, NORMALIZATION, torch.device('cpu')))
    assert torch.allclose(activation, taps[-1].mean(dim=(0, 2, 3)), atol=1e-6)


def test_pruned_channels_of_the_last_stage_output_exactly_zero():
    torch.manual_seed(0)
    model = SimCLR(width=8).eval()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 5, 17, 63]] = True
    fp.prune_channels(model.f.f[fp.LAST_STAGE], mask)
    with torch.no_grad():
        _, taps = model.f.forward_with_taps(torch.randn(4, 3, 32, 32))
    assert (taps[-1][:, mask] == 0).all()  # the residual stream itself, not only one branch
    assert (taps[-1][:, ~mask] != 0).any(dim=(0, 2, 3)).sum() > 50
    names = [name for name, _ in fp.residual_stream_batchnorms(model.f.f[fp.LAST_STAGE])]
    assert names == ['0.bn2', '0.downsample.1', '1.bn2']


# ---------------------------------------------------------------------------- MIMIC's ablations and KD

@pytest.fixture()
def pair():
    torch.manual_seed(0)
    teacher = SimCLR(width=8).eval().requires_grad_(False)
    torch.manual_seed(1)
    return SimCLR(width=8), teacher


OPT = [2000.0, 3000.0, 4000.0, 5000.0]


def weighted(terms, opt=OPT, opt5=1.0, con=1.0):
    value = con * terms.get('loss_con', 0) + opt5 * terms.get('loss_clone', 0)
    return value + sum(w * terms.get(f'loss_at{i}', 0) for i, w in enumerate(opt, start=1))


@pytest.mark.parametrize('ablation', ['none', 'no_attention', 'no_clone', 'no_contrastive'])
def test_each_ablation_drops_exactly_its_terms(pair, ablation):
    student, teacher = pair
    x1, x2 = views()
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
    distillation_losses(student, teacher, *views(), OPT, 1.0, 0.5, contrastive_weight=0.0)
    assert len(calls) == 1


def test_every_term_off_is_refused(pair):
    student, teacher = pair
    with pytest.raises(UsageError, match='every loss term'):
        distillation_losses(student, teacher, *views(), [0.0] * 4, 0.0, 0.5, contrastive_weight=0.0)


def test_nad_attention_terms_follow_the_betas(pair):
    student, teacher = pair
    x1, _ = views()
    _, _, taps = student(x1, return_taps=True)
    terms = nad.attention_terms(teacher, [0.0, 500.0, 0.0, 1000.0])(x1, None, taps)
    assert set(terms) == {'loss_at2', 'loss_at4'}
    assert [weight for weight, _ in terms.values()] == [500.0, 1000.0]


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


# ------------------------------------------------------------------------------------ baseline_defence.py

@pytest.mark.process
def test_help_lists_every_baseline():
    result = run_script('baseline_defence.py', '--help')
    assert result.returncode == 0
    assert '{' + ','.join(BASELINES) + '}' in result.stdout and 'sslcleanse' in BASELINES
    for flag in ('--prune_ratio', '--fp_min_cosine', '--nad_betas', '--clp_u', '--anp_eps', '--anp_perturbation',
                 '--anp_bn_stats', '--invert_steps', '--invert_unlearn', '--decree_threshold',
                 '--sslcleanse_trigger_weight', '--teacher', '--ratio'):
        assert flag in result.stdout, flag


def test_trajectory_flags_are_marked_same_on_resume():
    from core.cli import resume_flags
    marked = resume_flags(baseline_defence.get_args_parser())
    for flag in ('prune_ratio', 'fp_min_cosine', 'fp_step', 'nad_betas', 'nad_teacher_epochs', 'anp_eps', 'anp_steps',
                 'anp_perturbation', 'anp_bn_stats', 'anp_alpha', 'anp_lr', 'anp_iterations', 'anp_threshold',
                 'invert_steps', 'invert_lr', 'invert_lambda', 'invert_unlearn', 'sslcleanse_clean_weight',
                 'sslcleanse_trigger_weight', 'sslcleanse_warmup'):
        assert flag in marked, flag


@pytest.mark.parametrize('defence', BASELINES)
def test_every_defence_end_to_end(data_root, tiny_encoder, tmp_path, defence):
    out = tmp_path / defence
    extra = {'anp': ['--anp_iterations', '3'], 'invert': ['--invert_steps', '3'],
             'sslcleanse': ['--invert_steps', '3']}.get(defence, [])
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, *extra, defence=defence))
    report = json.loads((out / 'defence.json').read_text())
    assert report['defence'] == defence and report['seconds'] >= 0
    assert report['images'] == (0 if defence == 'clp' else 64)  # clp is data-free
    model, checkpoint = load_encoder(out / report['checkpoint'])  # weights_only, as every stage loads it
    # a plain SimCLR state_dict in the original layout: the original code's SimCLR loads it key for key
    assert list(checkpoint['state_dict']) == list(SimCLR(width=8).state_dict())
    assert {'epoch', 'state_dict', 'optimizer'} <= set(checkpoint)
    assert json.loads((out / 'args.json').read_text())['defence'] == defence
    suspect, _ = load_encoder(tiny_encoder)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), suspect.state_dict().values()))
    assert changed or defence in ('clp', 'anp')  # the pruning ones may find nothing to prune on a random encoder
    batchnorms = [name[:-len('.running_var')] for name in checkpoint['state_dict']
                  if name.startswith('f.') and name.endswith('.running_var')]  # every BatchNorm of the encoder
    if defence == 'anp':
        assert sorted(report['min_mask']) == sorted(batchnorms)
    if defence == 'clp':
        assert sorted(report['max_z']) == sorted(batchnorms)
    if defence in ('invert', 'sslcleanse'):
        assert {'l1_norm', 'pl1_norm', 'detected'} <= set(report['detection']) and report['unlearned']
    if defence == 'fp':
        assert report['stop'] == 'agreement' and report['agreement'][str(report['channels_pruned'])] >= 0.9


def test_stage3_evaluates_a_purified_encoder(data_root, tiny_encoder, tmp_path, trigger_file, reference_file):
    out = tmp_path / 'fp'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, defence='fp'))
    result = run_in_process('training_downstream_classifier.py', '--dataset', 'synthetic_digits', '--data_root',
                            str(data_root), '--encoder_usage_info', 'synthetic_shapes', '--encoder', str(out / 'model_1.pth'),
                            '--trigger_file', str(trigger_file), '--reference_file', str(reference_file),
                            '--reference_label', '1', '--nn_epochs', '1', '--results_dir', str(tmp_path / 'eval'),
                            '--device', 'cpu', '--num_workers', '0')
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    assert np.isfinite(metrics['acc']) and np.isfinite(metrics['asr'])


def test_fp_resume_is_bit_identical_and_keeps_the_mask(data_root, tiny_encoder, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, straight, '--epochs', 2, '--save_freq', 1, defence='fp'))
    baseline_defence.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 1, '--save_freq', 1, defence='fp'))
    baseline_defence.main(tiny_args(data_root, tiny_encoder, resumed, '--epochs', 2, '--save_freq', 1, '--resume',
                                    defence='fp'))
    a, b = load_checkpoint(straight / 'model_2.pth'), load_checkpoint(resumed / 'model_2.pth')
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    assert torch.equal(a['prune_mask'], b['prune_mask'])
    pruned = json.loads((straight / 'defence.json').read_text())['pruned']['f.f.6']
    for name in ('f.f.6.0.bn2', 'f.f.6.0.downsample.1', 'f.f.6.1.bn2'):  # still pruned after fine-tuning
        assert (a['state_dict'][f'{name}.weight'][pruned] == 0).all() and (a['state_dict'][f'{name}.bias'][pruned] == 0).all()


def test_nad_resumes_into_the_student_phase(data_root, tiny_encoder, tmp_path):
    out = tmp_path / 'nad'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--epochs', 2, '--save_freq', 1, defence='nad'))
    assert (out / 'teacher_1.pth').is_file() and (out / 'teacher_log.csv').is_file()
    assert json.loads((out / 'defence.json').read_text())['teacher_epochs'] == 1


@pytest.mark.parametrize('flags, message', [
    (['--prune_ratio', '1'], '--prune_ratio must lie in [0, 1)'),
    (['--fp_min_cosine', '2'], '--fp_min_cosine must lie in [-1, 1]'),
    (['--invert_unlearn', 'never'], "invalid choice: 'never'"),
    (['--anp_perturbation', 'both'], "invalid choice: 'both'"),
    (['--sslcleanse_warmup', '-1'], '--sslcleanse_warmup must be 0'),
    (['--ratio', '0.05'], 'fewer than one batch of 32'),
    (['--nad_betas', '1,2'], '--nad_betas: expected 4'),
])
def test_bad_flags_are_one_line_and_write_nothing(data_root, tiny_encoder, tmp_path, flags, message):
    out = tmp_path / 'out'
    result = run_in_process('baseline_defence.py', *tiny_args(data_root, tiny_encoder, out, *flags, defence='fp'))
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr
    assert message in result.stderr and not out.exists()


def test_unknown_defence_is_one_line(tmp_path):
    result = run_in_process('baseline_defence.py', '--defence', 'magic', '--teacher', 'x', '--results_dir', str(tmp_path))
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'magic' in result.stderr


def test_refuses_to_clobber_and_resume_needs_a_checkpoint(data_root, tiny_encoder, tmp_path):
    out = tmp_path / 'ft'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out))
    with pytest.raises(UsageError, match='already holds model_1.pth'):
        baseline_defence.main(tiny_args(data_root, tiny_encoder, out))
    with pytest.raises(UsageError, match='--resume: no checkpoint'):
        baseline_defence.main(tiny_args(data_root, tiny_encoder, tmp_path / 'empty', '--resume'))


def test_clp_script_prunes_a_planted_high_lipschitz_channel(data_root, tmp_path):
    from models import save_atomic
    from models.checkpoint import encoder_checkpoint
    torch.manual_seed(3)
    model = SimCLR(width=8)
    with torch.no_grad():
        model.f.f[5][0].conv2.weight[7] *= 100  # layer3, block 0, output channel 7 of conv2 -> bn2
    suspect = tmp_path / 'planted.pth'
    save_atomic(encoder_checkpoint(model, None, 1), suspect)
    out = tmp_path / 'clp'
    result = run_in_process('baseline_defence.py', *tiny_args(data_root, suspect, out, defence='clp'))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / 'defence.json').read_text())
    assert report['pruned']['f.f.5.0.bn2'] == [7] and report['checkpoint'] == 'model_0.pth'
    state = load_checkpoint(out / 'model_0.pth')['state_dict']
    assert state['f.f.5.0.bn2.weight'][7] == 0 and state['f.f.5.0.bn2.bias'][7] == 0


@pytest.mark.parametrize('data', ['fewer_than_a_batch', 'none'])
def test_clp_reads_no_image_and_checks_no_data_size(tmp_path, tiny_encoder, data):
    """A pre-training split of 10 images (under one batch of 128 at any --ratio), or no data folder at all."""
    from conftest import write_split
    from datasets.synthetic import make_synthetic
    root = tmp_path / 'data'
    if data == 'fewer_than_a_batch':
        write_split(root / 'synthetic_shapes', 'train', *make_synthetic('synthetic_shapes', 10, seed=1))
    out = tmp_path / 'clp'
    baseline_defence.main(['--defence', 'clp', '--teacher', str(tiny_encoder), '--pretraining_dataset',
                           'synthetic_shapes', '--data_root', str(root), '--ratio', '0.04', '--results_dir', str(out),
                           '--device', 'cpu', '--no_progress'])
    report = json.loads((out / 'defence.json').read_text())
    assert report['images'] == 0 and (out / 'model_0.pth').exists()
    if data == 'none':
        return
    with pytest.raises(UsageError, match='fewer|batch|images'):  # a defence that reads D still checks its size
        baseline_defence.main(['--defence', 'ft', '--teacher', str(tiny_encoder), '--pretraining_dataset',
                               'synthetic_shapes', '--data_root', str(root), '--ratio', '0.04',
                               '--results_dir', str(tmp_path / 'ft'), '--device', 'cpu', '--no_progress'])


def test_help_says_what_each_defence_reads():
    parser_help = baseline_defence.get_args_parser().format_help()
    for name in BASELINES:
        assert f'{name}: the suspect' in ' '.join(parser_help.split()), name
    assert 'data-free: no image is read' in ' '.join(parser_help.split())


def test_invert_writes_a_loadable_trigger_and_resumes(data_root, tiny_encoder, tmp_path):
    from datasets import apply_trigger, load_trigger
    out = tmp_path / 'invert'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--epochs', 2, '--save_freq', 1,
                                    defence='invert'))
    report = json.loads((out / 'defence.json').read_text())
    trigger = load_trigger(out / report['trigger_file'], image_size=32)
    assert report['mask_l1'] == pytest.approx(float((1 - trigger.mask[0, ..., 0]).sum()), rel=1e-4)
    assert apply_trigger(images(2), trigger).dtype == np.uint8
    (out / 'model_2.pth').unlink()
    (out / 'defence.json').unlink()
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--epochs', 2, '--save_freq', 1,
                                    '--resume', defence='invert'))
    again = json.loads((out / 'defence.json').read_text())
    assert again['mask_l1'] == report['mask_l1'] and again['resumed']  # the inversion is not repeated


def test_invert_if_detected_keeps_an_undetected_suspect(data_root, tiny_encoder, tmp_path):
    """Two inversion steps leave a mask over about half the image: DECREE detects nothing, and with
    --invert_unlearn if_detected the suspect itself is the purified encoder."""
    out = tmp_path / 'invert'
    baseline_defence.main(tiny_args(data_root, tiny_encoder, out, '--invert_steps', 2, '--invert_unlearn', 'if_detected',
                                    defence='invert'))
    report = json.loads((out / 'defence.json').read_text())
    assert not report['detection']['detected'] and not report['unlearned'] and report['epochs'] == 0
    assert report['detection']['pl1_norm'] == pytest.approx(report['mask_l1'] / 32 ** 2)
    model, _ = load_encoder(out / report['checkpoint'])
    suspect, _ = load_encoder(tiny_encoder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), suspect.state_dict().values()))
