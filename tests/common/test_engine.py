"""The training engine (common/engine.py) on hand-made steps: its means, its log and checkpoints, its resume."""
from __future__ import annotations

import argparse
import ast
import json

import pytest
import torch

from common.cli import seed_everything
from common.engine import Training, train_steps
from common.runs import check_resumable, read_csv
from conftest import REPO
from core.cli import SameOnResume, StageParser, resume_flags, same_on_resume
from core.errors import NonFiniteLossError, UsageError
from models import CheckpointError, load_checkpoint

CPU = torch.device('cpu')


def constant_steps(values: list[float]):
    """A step loss that returns the next of `values` (through a parameter, so that backward has work)."""
    weight = torch.nn.Parameter(torch.ones(()))
    remaining = iter(values)

    def step_loss(x):
        value = next(remaining)
        return weight * value, {'term': torch.tensor(2 * value)}
    return weight, step_loss


def test_train_steps_mean_over_steps_and_over_images():
    batches = [(torch.zeros(4, 1),), (torch.zeros(4, 1),), (torch.zeros(2, 1),)]
    weight, step_loss = constant_steps([1.0, 2.0, 6.0])
    means = train_steps(batches, torch.optim.SGD([weight], lr=0.0), step_loss, epoch=1, device=CPU,
                        disable_progress=True)
    assert means == pytest.approx({'loss': 3.0, 'term': 6.0})  # (1 + 2 + 6) / 3
    weight, step_loss = constant_steps([1.0, 2.0, 6.0])
    means = train_steps(batches, torch.optim.SGD([weight], lr=0.0), step_loss, epoch=1, device=CPU, per_image=True,
                        disable_progress=True)
    assert means['loss'] == pytest.approx((4 * 1 + 4 * 2 + 2 * 6) / 10)


def test_train_steps_steps_the_optimiser_and_runs_after_step_after_each_step():
    weight = torch.nn.Parameter(torch.zeros(()))
    calls = []

    def step_loss(x):
        calls.append('loss')
        return (weight - 1) ** 2, {}
    train_steps([(torch.ones(1),)] * 3, torch.optim.SGD([weight], lr=0.5), step_loss, epoch=1, device=CPU,
                after_step=lambda: calls.append('step'), disable_progress=True)
    assert calls == ['loss', 'step'] * 3
    assert weight.item() == pytest.approx(1.0)  # 0 -> 1 in the first step (gradient -2, lr 0.5), then stays


def test_a_per_step_schedule_sets_each_steps_learning_rate_before_it():
    """lr_at(epoch, step from 0): SGD on (w - 1)² from w = 0 moves w by 2·lr·(1 - w) each step."""
    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=99.0)
    seen = []

    def lr_at(epoch: int, step: int) -> float:
        seen.append((epoch, step))
        return [0.25, 0.125][step]
    train_steps([(torch.ones(1),)] * 2, optimizer, lambda x: ((weight - 1) ** 2, {}), epoch=3, device=CPU,
                lr_at=lr_at, disable_progress=True)
    assert seen == [(3, 0), (3, 1)] and optimizer.param_groups[0]['lr'] == 0.125
    assert weight.item() == pytest.approx(0.625)  # 0 + 2·0.25·1 = 0.5, then 0.5 + 2·0.125·0.5 = 0.625


def test_a_non_finite_loss_names_the_epoch_and_the_step_from_one():
    weight, step_loss = constant_steps([1.0, float('nan')])
    with pytest.raises(NonFiniteLossError, match='epoch 4, step 2'):
        train_steps([(torch.zeros(1),)] * 2, torch.optim.SGD([weight], lr=0.1), step_loss, epoch=4, device=CPU,
                    disable_progress=True)


def tiny_training(tmp_path, epochs: int, save_freq: int = 1, **kwargs) -> Training:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    args = argparse.Namespace(save_freq=save_freq, no_progress=True, lr=0.1, seed=0)
    return Training(model, torch.optim.SGD(model.parameters(), lr=0.1), args, epochs, tmp_path, **kwargs)


def train_noisy(training: Training) -> list[dict]:
    """Each epoch: one SGD step on random data (so the RNG and the weights both move); after it, a monitor."""
    for epoch in training.loop():
        x = torch.randn(8, 2)
        row = {'epoch': epoch, **train_steps([(x,)], training.optimizer, lambda x: (training.model(x).pow(2).mean(), {}),
                                             epoch=epoch, device=CPU, disable_progress=True)}
        row['monitor'] = float(epoch * 10)
        training.end_epoch(row, extra=epoch)
    return training.rows


def test_the_loop_logs_every_epoch_and_checkpoints_every_save_freq(tmp_path, capsys):
    training = tiny_training(tmp_path, epochs=5, save_freq=2)
    rows = train_noisy(training)
    assert [row['epoch'] for row in rows] == [1, 2, 3, 4, 5] and rows[2]['monitor'] == 30.0
    assert sorted(path.name for path in tmp_path.glob('*.pth')) == ['model_2.pth', 'model_4.pth', 'model_5.pth']
    checkpoint = load_checkpoint(tmp_path / 'model_4.pth')
    assert checkpoint['epoch'] == 4 and checkpoint['extra'] == 4 and len(checkpoint['log']) == 4
    assert [int(row['epoch']) for row in read_csv(tmp_path / 'log.csv')] == [1, 2, 3, 4, 5]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    assert [line['epoch'] for line in lines] == [1, 2, 3, 4, 5] and 'phase' not in lines[0]
    assert training.finished


def test_resume_continues_bit_for_bit(tmp_path):
    straight = tiny_training(tmp_path / 'straight', epochs=4)
    (tmp_path / 'straight').mkdir()
    seed_everything(5)
    train_noisy(straight)

    (tmp_path / 'stopped').mkdir()
    stopped = tiny_training(tmp_path / 'stopped', epochs=2)
    seed_everything(5)
    train_noisy(stopped)
    (tmp_path / 'stopped' / 'model_2.pth').rename(tmp_path / 'stopped' / 'latest.pth')
    seed_everything(99)  # a new process: other RNG states, fresh weights
    resumed = tiny_training(tmp_path / 'stopped', epochs=4)
    with torch.no_grad():
        resumed.model.weight.fill_(7.0)
    checkpoint = resumed.resume(tmp_path / 'stopped' / 'latest.pth', {'lr': None})
    assert checkpoint['extra'] == 2 and resumed.start_epoch == 3 and len(resumed.rows) == 2
    train_noisy(resumed)
    assert torch.equal(resumed.model.weight, straight.model.weight)
    assert [row['monitor'] for row in resumed.rows] == [10.0, 20.0, 30.0, 40.0]


def test_resume_refuses_other_settings_and_foreign_checkpoints(tmp_path):
    train_noisy(tiny_training(tmp_path, epochs=1))
    other = tiny_training(tmp_path, epochs=2)
    other.args.lr = 0.2
    with pytest.raises(UsageError, match=r'--lr 0\.1 -> 0\.2'):
        other.resume(tmp_path / 'model_1.pth', {'lr': None})
    torch.save({'epoch': 1, 'state_dict': other.model.state_dict()}, tmp_path / 'foreign.pth')
    with pytest.raises(CheckpointError, match='records no run arguments'):
        other.resume(tmp_path / 'foreign.pth', {'lr': None})


def test_a_flag_a_checkpoint_does_not_record_compares_as_its_default(tmp_path):
    args = argparse.Namespace(lr=0.1, optimizer='adam')
    check_resumable({'args': {'lr': 0.1}, 'rng': {}}, args, tmp_path / 'm.pth', {'lr': None, 'optimizer': 'adam'})
    with pytest.raises(UsageError, match="--optimizer 'adam' -> 'sgd'"):
        check_resumable({'args': {'lr': 0.1}, 'rng': {}}, argparse.Namespace(lr=0.1, optimizer='sgd'),
                        tmp_path / 'm.pth', {'lr': None, 'optimizer': 'adam'})


def test_resume_flags_are_the_marked_ones_of_parser_groups_and_parents():
    parent = argparse.ArgumentParser(add_help=False)
    same_on_resume(parent.add_argument('--seed', default=1, type=int))
    parser = StageParser(parents=[parent])
    same = SameOnResume(parser.add_argument_group('run'))
    same.add_argument('--lr', default=0.5, type=float)
    parser.add_argument('--epochs', default=3, type=int)
    assert resume_flags(parser) == {'seed': 1, 'lr': 0.5}


def test_a_phase_label_names_the_printed_lines_and_no_results_dir_writes_nothing(tmp_path, capsys):
    training = tiny_training(None, epochs=1, label='Teacher', log_name=None)
    train_noisy(training)
    line = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith('{')][0])
    assert line['phase'] == 'Teacher' and line['epoch'] == 1
    assert list(tmp_path.iterdir()) == []


def test_parallel_hands_back_the_module_itself_in_one_process(tmp_path):
    training = tiny_training(tmp_path, epochs=1)
    part = training.model
    assert training.parallel(part, CPU) is part
    assert training.parallel(part, CPU, find_unused_parameters=True, sync_batchnorm=False) is part


def test_the_engine_is_the_one_place_a_trained_network_is_wrapped_for_torchrun():
    """`common.distributed.data_parallel` is called by `Training.parallel` alone: a stage or a defence that trains
    asks the engine for its wrapper."""
    callers = []
    for path in sorted(REPO.rglob('*.py')):
        relative = path.relative_to(REPO)
        if relative.parts[0] in {'tests', 'runs', 'data'} or 'site-packages' in relative.parts \
                or any(part.startswith('.') for part in relative.parts):
            continue  # the project's own modules: not the tests, a run folder, or a virtual environment
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = getattr(node.func, 'attr', getattr(node.func, 'id', '')) if isinstance(node, ast.Call) else ''
            if name in ('data_parallel', 'DistributedDataParallel'):
                callers.append(f'{relative}: {name}')
    assert callers == ['common/distributed.py: DistributedDataParallel', 'common/engine.py: data_parallel']
