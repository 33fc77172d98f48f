"""scripts/demo.sh with SEEDS: one run per seed in OUT/seed_<seed>/, and OUT/summary.json over them.

The training stages are replaced by a stand-in ($PYTHON runs it for train_clean_encoder.py, train_badencoder.py,
MIMIC.py and training_downstream_classifier.py) that writes each stage's final file, its args.json and, for the
probes, metrics that depend on the seed; everything else (the data, the reference, the pipeline driver, the
results table) runs for real. A real tiny run, every stage trained, takes about 100 s on the 2-core CI machine:

    SEEDS=0,1 PRETRAIN_SIZES=train=512,test=128 DOWNSTREAM_SIZES=train=200,test=100 CLEAN_EPOCHS=1 BAD_EPOCHS=1 \\
        MIMIC_EPOCHS=1 MI_EPOCHS=1 NN_EPOCHS=1 bash scripts/demo.sh OUT
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

STAND_IN = """import json, os, sys
script, argv = sys.argv[1], sys.argv[2:]
value = lambda flag: argv[argv.index(flag) + 1]
seed = int(value('--seed'))
step = seed % 10  # the metrics' dependence on the seed (100, the default, as 0)
if script == 'training_downstream_classifier.py':
    names = argv[argv.index('--names') + 1:]
    encoders = argv[argv.index('--encoder') + 1:argv.index('--names')]
    for index, (name, encoder) in enumerate(zip(names, encoders)):
        folder = os.path.join(value('--results_dir'), name)
        os.makedirs(folder, exist_ok=True)
        asr = 90.0 + 3 * step if name == 'eval_backdoored' else 10.0 + index + 5 * step * step
        with open(os.path.join(folder, 'metrics.json'), 'w') as out:
            json.dump({'acc': 40.0 + index + 7 * step, 'asr': asr, 'asr_excluding_target': asr - 1,
                       'epoch': int(value('--nn_epochs')), 'encoder': encoder}, out)
        with open(os.path.join(folder, 'args.json'), 'w') as out:
            json.dump({'seed': seed}, out)
else:
    folder, epochs = value('--results_dir'), value('--epochs')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'args.json'), 'w') as out:
        json.dump({'seed': seed}, out)
    final = f'model{epochs}.pth' if script == 'MIMIC.py' else f'model_{epochs}.pth'
    open(os.path.join(folder, final), 'wb').close()
"""
STAGES = ('train_clean_encoder.py', 'train_badencoder.py', 'MIMIC.py', 'training_downstream_classifier.py')
T_975 = {1: 12.706204736174707, 2: 4.302652729749464}  # t_{0.975, df}


def stand_in_python(folder: Path) -> Path:
    """A $PYTHON that runs the stand-in for a training stage (`python -u STAGE ...`) and python for the rest."""
    stand_in, python = folder / 'stand_in.py', folder / 'python'
    stand_in.write_text(STAND_IN)
    cases = '|'.join(STAGES)
    python.write_text(f'#!/bin/sh\nif [ "$1" = -u ]; then case "$2" in {cases}) shift; '
                      f'exec "{sys.executable}" "{stand_in}" "$@";; esac; fi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


def demo(out: Path, python: Path, **environ: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=str(python), OMP_NUM_THREADS='1', TQDM_DISABLE='1',
               PRETRAIN_SIZES='train=64,test=32', DOWNSTREAM_SIZES='train=40,test=20', CLEAN_EPOCHS='2',
               BAD_EPOCHS='1', MIMIC_EPOCHS='2', MI_EPOCHS='1', NN_EPOCHS='3')
    env.pop('SEEDS', None)
    env.update(environ)
    return subprocess.run(['bash', 'scripts/demo.sh', str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def check_pooled(entry: dict, n: int) -> None:
    """An encoder's or defence's summary over seeds equals what its own per_seed values give."""
    per_seed = entry['per_seed']
    assert entry['n'] == n == len(per_seed)
    for key in next(iter(per_seed.values())):
        values = [single[key] for single in per_seed.values()]
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        assert entry[key] == pytest.approx(mean) and entry[f'{key}_std'] == pytest.approx(std)
        assert entry[f'{key}_ci95'] == pytest.approx(T_975[n - 1] * std / math.sqrt(n))


@pytest.mark.process
def test_demo_with_seeds_runs_each_seed_and_pools_the_summary(tmp_path):
    python = stand_in_python(tmp_path)
    out = tmp_path / 'demo'
    result = demo(out, python, SEEDS='0,1')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for seed in (0, 1):
        run = out / f'seed_{seed}'
        assert json.loads((run / 'run.json').read_text())['seed'] == seed
        stages = ['clean', 'backdoor', 'mimic', 'eval_clean', 'eval_backdoored', 'eval_mimic']
        assert [json.loads((run / stage / 'args.json').read_text())['seed'] for stage in stages] == [seed] * 6
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary) == {'clean', 'backdoored', 'mimic'}
    for encoder in summary.values():
        check_pooled(encoder, 2)
        assert set(encoder['per_seed']) == {'0', '1'}
    assert summary['mimic']['per_seed']['1'] == {'acc': 49.0, 'asr': 17.0, 'asr_excluding_target': 16.0}
    assert summary['mimic']['asr'] == 14.5 and summary['mimic']['asr_ci95'] == pytest.approx(T_975[1] * 2.5)
    assert '| synthetic_shapes | synthetic_digits | badencoder | 2 |' in (out / 'table.md').read_text()

    # without SEEDS: one run in OUT itself, and summary.json without seeds (the data and reference reused)
    single = tmp_path / 'single'
    single.mkdir()
    shutil.copytree(out / 'data', single / 'data')
    shutil.copy(out / 'reference_one.npz', single)
    result = demo(single, python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(single.glob('seed_*')) and json.loads((single / 'run.json').read_text())['seed'] == 100
    summary = json.loads((single / 'summary.json').read_text())
    assert summary == {'clean': {'acc': 40.0, 'asr': 10.0, 'asr_excluding_target': 9.0},
                       'backdoored': {'acc': 41.0, 'asr': 90.0, 'asr_excluding_target': 89.0},
                       'mimic': {'acc': 42.0, 'asr': 12.0, 'asr_excluding_target': 11.0}}
