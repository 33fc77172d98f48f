"""scripts/plot_results.py on run directories written by hand in the pipeline's layout.

The files are those scripts/run_pipeline.sh leaves: run.json, mimic/mi.json (as MIMIC.py writes it),
eval_<name>/metrics.json and eval.log with the probe group's JSON lines (made with the probe's own
`metric_line`; an older layout keeps them in eval_<name>.log, which is read too), read by the run reader
the tables share (scripts/results/runs.py). The figures need matplotlib, an optional extra: those tests are skipped
without it; reading, errors and the missing-matplotlib message are tested either way.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script, write_split
from datasets import load_trigger
from datasets.synthetic import make_synthetic
from evaluation.metrics import EXCLUDING_TARGET_NAME, metric_line, metric_names

from scripts import plot_results
from scripts.results.runs import RunError, read_probe_log, read_probe_logs, read_run

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
LAYERS = {'layer3': 'f.f.3 (ResNet layer1)', 'layer4': 'f.f.4 (ResNet layer2)', 'layer5': 'f.f.5 (ResNet layer3)',
          'layer6': 'f.f.6 (ResNet layer4)'}


def write_trigger(path: Path, side: int) -> Path:
    """A white side x side patch in the bottom-right corner of a 32x32 image (the paper's, for side 10)."""
    t = np.zeros((1, 32, 32, 3))
    tm = np.ones((1, 32, 32, 3), dtype=np.int64)
    t[:, 31 - side:31, 31 - side:31] = 255
    tm[:, 31 - side:31, 31 - side:31] = 0
    np.savez(path, t=t, tm=tm, info=np.array([f'white_{31 - side}_{side}', 'replace']))
    return path


def probe_log(encoder_path: str, epochs: list[tuple[float, float, float]], start: int = 1,
              name: str | None = None) -> str:
    """What the pipeline keeps of a probe run: a loss line and three metric lines per epoch; with `name`, those
    of one probe of a group (its lines name it)."""
    accuracy, attack = metric_names(encoder_path)
    loss = '' if name is None else f' \tEncoder: {name}'
    lines = [f"{name + ': ' if name else ''}reference: mean cos(f(triggered), f(reference)) = 0.9, "
             'mean cos(f(clean), f(reference)) = 0.1']
    for epoch, (acc, asr, asr_excluding) in enumerate(epochs, start=start):
        lines += [f'Train Epoch: {epoch} \tLoss: 1.0{loss}', metric_line(accuracy, acc, epoch, name),
                  metric_line(attack, asr, epoch, name), metric_line(EXCLUDING_TARGET_NAME, asr_excluding, epoch, name)]
    return '\n'.join(lines) + '\n'


def interleaved(*logs: str) -> str:
    """The probes' logs as a group prints them: epoch by epoch (one loss line and three metric lines each)."""
    chunks = [log.splitlines() for log in logs]
    lines = [chunk[0] for chunk in chunks]
    for index in range(1, len(chunks[0]), 4):
        lines += [line for chunk in chunks for line in chunk[index:index + 4]]
    return '\n'.join(lines) + '\n'


def make_run(root: Path, name: str, trigger: Path, ratio: float = 0.04, uniform: bool = False,
             encoders: tuple[str, ...] = ('clean', 'backdoored', 'mimic', 'ft'), data_root: Path | None = None,
             downstream: str = 'synthetic_digits', group_log: bool = True, seed: int | None = None) -> Path:
    """A run directory; its probes' lines in eval.log (one stage-3 run for all), or with `group_log` False in
    eval_<name>.log (the pipeline's per-encoder evaluations before). With `seed`, run.json holds it and every
    ACC is higher by it."""
    run = root / name
    (run / 'mimic').mkdir(parents=True)
    (run / 'run.json').write_text(json.dumps({
        'pretraining_dataset': 'synthetic_shapes', 'downstream_dataset': downstream, 'target_label': 1,
        'attack': 'badencoder', 'trigger_file': str(trigger), 'ratio': ratio, 'nn_epochs': 3,
        **({} if seed is None else {'seed': seed})}))
    history = {layer: [0.1 * i, 0.2 * i, 0.15 * i] for i, layer in enumerate(LAYERS, start=1)}
    mi = None if uniform else {layer: values[-1] for layer, values in history.items()}
    weights = [0.25] * 4 if uniform else [v / sum(mi.values()) for v in mi.values()]
    (run / 'mimic' / 'mi.json').write_text(json.dumps({
        'mi_model': None if uniform else 'teacher', 'layer_weights': 'uniform' if uniform else 'mi', 'mi': mi,
        'weights': weights, 'opt': [1000 + 10000 * w for w in weights], 'base': [1000] * 4, 'fell_back': False,
        'layers': LAYERS, 'history': None if uniform else history}))
    logs = []
    for index, encoder in enumerate(encoders):
        folder = run / f'eval_{encoder}'
        folder.mkdir()
        asr = 95.0 if encoder == 'backdoored' else 5.0 + index
        curve = [(40.0 + index, asr / 2, asr / 3), (50.0 + index, asr - 1, asr - 2), (55.0 + ratio, asr, asr - 1)]
        encoder_path = str(run / ('clean/model_2.pth' if encoder == 'clean' else f'{encoder}/model_2.pth'))
        if group_log:
            logs.append(probe_log(encoder_path, curve, name=f'eval_{encoder}'))
        else:
            (run / f'eval_{encoder}.log').write_text(probe_log(encoder_path, curve))
        (folder / 'metrics.json').write_text(json.dumps({'acc': 55.0 + ratio + (seed or 0), 'asr': asr,
                                                         'asr_excluding_target': asr - 1, 'epoch': 3,
                                                         'encoder': encoder_path}))
        if data_root is not None:
            (folder / 'args.json').write_text(json.dumps({'dataset': downstream, 'data_dir': '',
                                                          'data_root': str(data_root)}))
    if logs:
        (run / 'eval.log').write_text(interleaved(*logs))
    return run


def png_title(path: Path) -> str:
    """The title plot_results keeps in the PNG's metadata (the same text as the figure's heading)."""
    from PIL import Image
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        return image.text['Title']


@pytest.fixture
def trigger10(tmp_path) -> Path:
    return write_trigger(tmp_path / 'white10.npz', 10)


# ------------------------------------------------------------------------------------------ reading

def test_probe_log_keeps_the_last_evaluation_and_the_latest_value_of_each_epoch(tmp_path):
    log = tmp_path / 'eval_mimic.log'
    text = probe_log('runs/x/mimic/model2.pth', [(10, 90, 89), (20, 80, 79), (30, 70, 69)])
    text += probe_log('runs/x/mimic/model2.pth', [(25, 60, 59), (35, 50, 49)], start=2)  # resumed from epoch 1
    text += '{"metric": "Eval - Backdoored Accuracy (BA)", "value": 4'  # cut short by a kill
    log.write_text(text)
    assert read_probe_log(log) == {'acc': {1: 10, 2: 25, 3: 35}, 'asr': {1: 90, 2: 60, 3: 50},
                                                'asr_excluding_target': {1: 89, 2: 59, 3: 49}}
    # evaluated again from scratch (another encoder): only that evaluation; CA / ASR-B names of a clean encoder
    log.write_text(text + '\n' + probe_log('runs/x/clean/model_2.pth', [(1, 2, 3)]))
    assert read_probe_log(log) == {'acc': {1: 1}, 'asr': {1: 2}, 'asr_excluding_target': {1: 3}}


def test_group_log_gives_each_probe_its_own_lines(tmp_path):
    log = tmp_path / 'eval.log'
    clean = probe_log('runs/x/clean/model_2.pth', [(10, 1, 0), (20, 2, 1)], name='eval_clean')
    mimic = probe_log('runs/x/mimic/model2.pth', [(30, 90, 89), (40, 80, 79)], name='eval_mimic')
    # a later run of the pipeline evaluates the MIMIC encoder again, alone: only its curves start over
    again = probe_log('runs/x/mimic/model2.pth', [(50, 5, 4)], name='eval_mimic')
    log.write_text(interleaved(clean, mimic) + again)
    curves = read_probe_logs(log)
    assert set(curves) == {'eval_clean', 'eval_mimic'}
    assert curves['eval_clean'] == {'acc': {1: 10, 2: 20}, 'asr': {1: 1, 2: 2}, 'asr_excluding_target': {1: 0, 2: 1}}
    assert read_probe_log(log, 'eval_mimic') == {'acc': {1: 50}, 'asr': {1: 5},
                                                              'asr_excluding_target': {1: 4}}
    assert read_probe_log(log) == {}  # no line of a single run


def test_group_log_and_per_encoder_logs_read_alike(tmp_path, trigger10):
    group = read_run(make_run(tmp_path / 'group', 'run', trigger10), 'run')
    single = read_run(make_run(tmp_path / 'single', 'run', trigger10, group_log=False), 'run')
    assert list(group.curves) == ['clean', 'backdoored', 'mimic', 'ft'] and group.curves == single.curves
    assert group.curves['backdoored']['asr'] == {1: 47.5, 2: 94.0, 3: 95.0}
    # a run whose older evaluations kept per-encoder logs, one encoder evaluated again by the group
    run = tmp_path / 'single' / 'run'
    (run / 'eval.log').write_text(probe_log(str(run / 'mimic/model_2.pth'), [(1, 2, 3)], name='eval_mimic'))
    mixed = read_run(run, 'run')
    assert mixed.curves['mimic'] == {'acc': {1: 1}, 'asr': {1: 2}, 'asr_excluding_target': {1: 3}}
    assert mixed.curves['clean'] == single.curves['clean']


def test_trigger_size_is_the_side_of_the_changed_area(tmp_path):
    for side in (3, 10):
        assert plot_results.trigger_size(load_trigger(write_trigger(tmp_path / f't{side}.npz', side))) == side
    blend = {'t': np.full((1, 32, 32, 3), 25.5), 'tm': np.full((1, 32, 32, 3), 0.9)}
    np.savez(tmp_path / 'blend.npz', **blend)
    assert plot_results.trigger_size(load_trigger(tmp_path / 'blend.npz')) == 32  # every pixel changes


def test_unique_tags_and_folders_of_runs(tmp_path, trigger10):
    for parent in ('a', 'b'):
        make_run(tmp_path / 'experiment' / parent, 'r', trigger10)
    runs = plot_results.run_dirs([tmp_path / 'experiment' / 'a', tmp_path / 'experiment' / 'b'])
    assert runs == [tmp_path / 'experiment' / 'a' / 'r', tmp_path / 'experiment' / 'b' / 'r']
    assert plot_results.unique_tags(runs) == ['a_r', 'b_r']
    assert plot_results.unique_tags([Path('x/r'), Path('y/s')]) == ['r', 's']


def test_missing_matplotlib_is_one_line(tmp_path, trigger10, monkeypatch, capsys):
    run = make_run(tmp_path, 'run', trigger10)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    assert plot_results.main([str(run), '--out', str(tmp_path / 'figures')]) == 2
    assert capsys.readouterr().err == 'error: plotting needs matplotlib: pip install -r requirements-plot.txt\n'
    assert not (tmp_path / 'figures').exists()
    assert 'matplotlib' in (REPO / 'requirements-plot.txt').read_text()
    assert 'matplotlib' not in (REPO / 'requirements.txt').read_text()


def bad_json(run: Path) -> str:
    (run / 'mimic' / 'mi.json').write_text('{"mi": ')
    return 'mi.json: not valid JSON'


def bad_metric(run: Path) -> str:
    (run / 'eval_mimic' / 'metrics.json').write_text(json.dumps({'acc': 'high', 'asr': 1.0}))
    return "metrics.json: acc must be a number, found 'high'"


def bad_weights(run: Path) -> str:
    (run / 'mimic' / 'mi.json').write_text(json.dumps({'mi': None, 'weights': [0.5, 0.5], 'opt': [1.0]}))
    return "mi.json: expected 'weights' and 'opt'"


def no_run_json(run: Path) -> str:
    (run / 'run.json').unlink()
    return 'no run.json'


def not_there(run: Path) -> str:
    run.rename(run.with_name('elsewhere'))
    return 'no such run directory'


@pytest.mark.parametrize('spoil', [bad_json, bad_metric, bad_weights, no_run_json, not_there])
def test_bad_run_directories_are_one_line(tmp_path, trigger10, capsys, spoil):
    run = make_run(tmp_path, 'run', trigger10)
    message = spoil(run)
    assert plot_results.main([str(run), '--out', str(tmp_path / 'figures')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
    assert not (tmp_path / 'figures').exists()


def test_runs_that_differ_only_in_seed_are_grouped_for_the_mean_figure(tmp_path, trigger10):
    seeds = [make_run(tmp_path / 'run', f'seed_{seed}', trigger10, seed=seed) for seed in (0, 1, 2)]
    other = make_run(tmp_path / 'elsewhere', 'seed_0', trigger10, ratio=0.5, seed=0)  # another setting
    lone = make_run(tmp_path / 'old', 'run', trigger10)  # no seed in its run.json
    paths = seeds + [other, lone]
    runs = [read_run(path, tag) for path, tag in zip(paths, plot_results.unique_tags(paths))]
    groups = plot_results.same_setting_but_seed(runs)
    assert [[run.path for run in group] for group in groups] == [seeds]
    assert plot_results.group_tags(groups) == ['run']
    assert plot_results.group_tags([runs[:2], [runs[2], runs[3]]]) == ['run', 'seed_2_seeds']


# ------------------------------------------------------------------------------------------ figures

def test_figures_of_one_run(tmp_path, trigger10, capsys):
    pytest.importorskip('matplotlib')
    data_root = tmp_path / 'data'
    x, y = make_synthetic('synthetic_digits', 4, seed=3)
    write_split(data_root / 'synthetic_digits', 'test', x, y)
    run = make_run(tmp_path, 'cifar10_gtsrb', trigger10, data_root=data_root)
    out = tmp_path / 'figures'
    assert plot_results.main([str(run), '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['cifar10_gtsrb_defences.png', 'cifar10_gtsrb_mi.png',
                                                     'cifar10_gtsrb_probe.png', 'trigger_white10.png']
    assert 'mutual information per tapped layer (teacher)' in png_title(out / 'cifar10_gtsrb_mi.png')
    assert 'ACC and ASR after each epoch' in png_title(out / 'cifar10_gtsrb_probe.png')
    title = png_title(out / 'cifar10_gtsrb_defences.png')
    assert 'ACC, ASR and ASR* per encoder and defence, 3-epoch probe' in title
    assert '(synthetic_shapes → synthetic_digits, badencoder)' in title
    title = png_title(out / 'trigger_white10.png')
    assert 'white10.npz' in title and 'synthetic_digits test image 0' in title and 'size 10 px' in title
    assert 'no ACC/ASR sweep' not in capsys.readouterr().out  # one run: no sweep expected, no note


def test_uniform_weights_and_no_data_found(tmp_path, trigger10, capsys):
    pytest.importorskip('matplotlib')
    run = make_run(tmp_path, 'uniform', trigger10, uniform=True, encoders=('mimic',), downstream='gtsrb')
    (run / 'eval.log').unlink()  # an evaluation run by hand: no per-epoch values
    setting = json.loads((run / 'run.json').read_text())
    (run / 'run.json').write_text(json.dumps({**setting, 'label': 'no MI guidance'}))  # run_pipeline.sh --label
    out = tmp_path / 'figures'
    assert plot_results.main([str(run), '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['trigger_white10.png', 'uniform_defences.png', 'uniform_mi.png']
    title = png_title(out / 'uniform_mi.png')
    assert title.startswith('no MI guidance (synthetic_shapes → gtsrb, badencoder): MIMIC layer weights, uniform')
    assert 'uniform (--layer_weights uniform, no MI step)' in title
    assert 'synthetic image (synthetic_shapes)' in png_title(out / 'trigger_white10.png')
    assert 'no per-epoch probe values' in capsys.readouterr().out


def test_ratio_sweep_is_found_and_plotted(tmp_path, trigger10):
    pytest.importorskip('matplotlib')
    runs = [make_run(tmp_path / 'experiment', f'ratio_{ratio}', trigger10, ratio=ratio) for ratio in (0.01, 0.04, 0.1)]
    out = tmp_path / 'figures'
    assert plot_results.main([str(tmp_path / 'experiment'), '--out', str(out)]) == 0
    title = png_title(out / 'acc_asr_vs_ratio.png')
    assert 'against the clean-data fraction' in title and '3 runs' in title
    assert all((out / f'{run.name}_{kind}.png').is_file() for run in runs for kind in ('mi', 'probe', 'defences'))
    assert len(list(out.glob('trigger_*.png'))) == 1  # one trigger file shared by the runs
    assert not (out / 'acc_asr_vs_trigger_size.png').exists()


def test_trigger_size_sweep_and_choosing_the_axis(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    small, large = write_trigger(tmp_path / 'white3.npz', 3), write_trigger(tmp_path / 'white10.npz', 10)
    runs = [make_run(tmp_path, 'small', small), make_run(tmp_path, 'large', large)]
    out = tmp_path / 'figures'
    assert plot_results.main([*map(str, runs), '--out', str(out)]) == 0
    assert 'against the trigger size' in png_title(out / 'acc_asr_vs_trigger_size.png')
    assert {p.name for p in out.glob('trigger_*.png')} == {'trigger_white3.png', 'trigger_white10.png'}

    other = make_run(tmp_path, 'other_ratio', small, ratio=0.5)  # now the runs differ in both
    capsys.readouterr()
    assert plot_results.main([*map(str, runs), str(other), '--out', str(tmp_path / 'both')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'differ in both ratio and trigger size' in err and '--x' in err
    assert plot_results.main([*map(str, runs), str(other), '--out', str(tmp_path / 'both'), '--x', 'ratio']) == 0
    assert (tmp_path / 'both' / 'acc_asr_vs_ratio.png').is_file()
    assert not (tmp_path / 'both' / 'acc_asr_vs_trigger_size.png').exists()

    capsys.readouterr()
    assert plot_results.main([str(runs[0]), '--out', str(tmp_path / 'one'), '--x', 'ratio']) == 2
    err = capsys.readouterr().err  # a single run cannot differ from the others in anything
    assert err.count('\n') == 1 and err.startswith('error: --x ratio: no setting') and 'differ in ratio' in err


def test_seeds_are_drawn_as_means_with_their_intervals(tmp_path, trigger10):
    pytest.importorskip('matplotlib')
    for ratio in (0.01, 0.1):  # a ratio sweep measured with two seeds at each ratio
        for seed in (0, 1):
            make_run(tmp_path / 'experiment' / f'ratio_{ratio}', f'seed_{seed}', trigger10, ratio=ratio, seed=seed)
    out = tmp_path / 'figures'
    runs = sorted(map(str, (tmp_path / 'experiment').glob('ratio_*/seed_*')))
    assert plot_results.main([*runs, '--out', str(out)]) == 0
    for ratio in (0.01, 0.1):
        title = png_title(out / f'ratio_{ratio}_defences_mean.png')
        assert title.startswith(f'ratio_{ratio} (synthetic_shapes → synthetic_digits, badencoder): ACC, ASR and ASR*')
        assert 'mean and 95% interval over 2 seeds (0, 1; dots: each seed)' in title
        assert (out / f'ratio_{ratio}_seed_0_defences.png').is_file()  # each seed's own figures too
    assert '4 runs' in png_title(out / 'acc_asr_vs_ratio.png')


def test_trigger_files_of_the_same_name_get_one_figure_each(tmp_path):
    pytest.importorskip('matplotlib')
    runs = []
    for side in (4, 6):
        (tmp_path / f'set{side}').mkdir()
        runs.append(make_run(tmp_path / 'runs', f'patch{side}', write_trigger(tmp_path / f'set{side}' / 'patch.npz',
                                                                               side)))
    out = tmp_path / 'figures'
    assert plot_results.main([*map(str, runs), '--out', str(out)]) == 0
    assert 'size 4 px' in png_title(out / 'trigger_patch_1.png')
    assert 'size 6 px' in png_title(out / 'trigger_patch_2.png')


@pytest.mark.process
def test_as_a_user(tmp_path, trigger10):
    pytest.importorskip('matplotlib')
    run = make_run(tmp_path, 'run', trigger10)
    result = run_script('scripts/plot_results.py', str(run), '--out', str(tmp_path / 'figures'))
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith('wrote ')]) == 4
    bad = run_script('scripts/plot_results.py', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'x'))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f'error: {tmp_path / "nowhere"}: no such '
                                                                      'run directory']


def test_mimic_curve_reads_each_checkpoints_probe_and_the_loss(tmp_path, trigger10):
    run = make_run(tmp_path, 'run', trigger10)
    setting = json.loads((run / 'run.json').read_text())
    (run / 'run.json').write_text(json.dumps({**setting, 'mimic_epochs': 30}))
    for epoch, asr in ((10, 80.0), (20, 40.0)):
        (run / 'mimic_curve' / f'mimic_{epoch}').mkdir(parents=True)
        (run / 'mimic_curve' / f'mimic_{epoch}' / 'metrics.json').write_text(json.dumps(
            {'acc': 30.0 + epoch, 'asr': asr, 'asr_excluding_target': asr - 1, 'epoch': 3}))
    (run / 'mimic' / 'log.csv').write_text('epoch,loss,con\n1,5.5,2.0\n2,4.5,1.5\n3,,1.0\n')
    read = read_run(run, 'run')
    assert {epoch: metrics['asr'] for epoch, metrics in read.mimic_curve.items()} == {10: 80.0, 20: 40.0, 30: 7.0}
    assert read.mimic_log == {'loss': {1: 5.5, 2: 4.5}, 'con': {1: 2.0, 2: 1.5, 3: 1.0}}
    assert plot_results.main([str(run), '--out', str(tmp_path / 'figures')]) == 0
    assert png_title(tmp_path / 'figures' / 'run_mimic_curve.png').endswith('MIMIC over its epochs')
    (run / 'mimic_curve' / 'mimic_20' / 'metrics.json').write_text('{"acc": "x"}')
    with pytest.raises(RunError):
        read_run(run, 'run')
