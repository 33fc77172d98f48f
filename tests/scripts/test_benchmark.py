"""scripts/benchmark.py: one JSON line with the five figures and the forward counts; its timing tools."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_script
from defences import BASELINES, TRAINING_BASELINES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'scripts'))
import benchmark  # noqa: E402

TINY = ('--quick', '--width', '8', '--device', 'cpu', '--num_workers', '0', '--batch_size', '16',
        '--badencoder_batch_size', '16', '--mimic_batch_size', '8', '--mi_batch_size', '16', '--mi_images', '32',
        '--probe_features', '256', '--probe_test_features', '64', '--probe_epochs', '10', '--knn_bank', '256',
        '--knn_queries', '32')


@pytest.mark.process
def test_quick_run_prints_the_figures_as_one_json_line():
    # --mi_epochs 1 equals --quick's one measured epoch, so only the probe time is extrapolated
    result = run_script('scripts/benchmark.py', *TINY, '--mi_epochs', '1', timeout=240)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    figures = json.loads(lines[0])
    for key in benchmark.FIGURES:
        assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures['mimic_student_forwards_per_step'] == 2
    assert figures['mimic_teacher_forwards_per_step'] == 1
    assert figures['mi_network_passes_per_image'] == 1
    assert figures['simclr_forwards_per_step'] == 2
    assert figures['badencoder_encoder_forwards_per_step'] == 1
    assert figures['mi_epochs_measured'] == 1 and figures['probe_epochs_measured'] == 3
    assert 'downstream_s' in figures['extrapolated'] and 'mi_estimation_s' not in figures['extrapolated']
    assert math.isclose(figures['downstream_s'], 10 * figures['probe_epoch_s'])
    assert (figures['width'], figures['threads'], figures['steps']) == (8, 1, 2)
    assert figures['batch_size']['simclr'] == 16 and figures['device'] == 'cpu'
    assert all(value > 0 for value in figures['paper_estimate_s'].values())
    assert 'stage 0: SimCLR' in result.stderr  # progress goes to stderr
    assert set(figures['defence_s']) == set(BASELINES)
    assert set(figures['defence_img_per_s']) == set(TRAINING_BASELINES)
    assert all(value > 0 for value in figures['defence_s'].values()) and figures['defence_images'] == 24
    assert set(figures['probe_group_speedup']) == {'3', '10'} and all(
        math.isfinite(value) and value > 0 for value in figures['probe_group_speedup'].values())


def test_a_real_world_family_reports_its_feature_pass_and_mimic_step(capsys):
    # in-process: a torchvision ResNet-18 at 224 pixels, batch 2, one timed step each
    benchmark.main(['--arch', 'torchvision_resnet18', '--quick', '--device', 'cpu', '--steps', '1', '--warmup', '0'])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ('visual_feature_img_per_s', 'visual_mimic_img_per_s', 'visual_mimic_step_s'):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert math.isclose(figures['visual_mimic_img_per_s'] * figures['visual_mimic_step_s'], 2)
    assert (figures['input_size'], figures['feature_dim'], figures['arch']) == (224, 512, 'torchvision_resnet18')
    assert figures['batch_size'] == {'feature': 2, 'mimic': 2} and figures['device'] == 'cpu'


@pytest.mark.process
def test_bad_count_is_a_one_line_error():
    result = run_script('scripts/benchmark.py', *TINY, '--mi_images', '4', timeout=60)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip().startswith('error: --mi_images 4') and len(result.stderr.strip().splitlines()) == 1


class SlowSteps:
    """A loader of `steps` batches (their indices), instantly available."""

    def __init__(self, steps: int):
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        yield from range(self.steps)


def test_timed_loader_times_only_the_steps_after_the_warmup():
    loader = benchmark.TimedLoader(SlowSteps(3), warmup=1, device=torch.device('cpu'))
    for step in loader:
        time.sleep(1.0 if step == 0 else 0.05)
    assert loader.timed_steps == 2
    assert 0.1 <= loader.seconds < 0.9  # the two timed steps, not the 1 s warm-up step


def test_counting_forwards_counts_calls_and_images_then_removes_its_hook():
    layer = torch.nn.Linear(3, 2)
    with benchmark.counting_forwards(layer) as counter:
        layer(torch.zeros(5, 3))
        layer(torch.zeros(2, 3))
    layer(torch.zeros(4, 3))
    assert counter == {'calls': 2, 'images': 7}
    assert not layer._forward_hooks
