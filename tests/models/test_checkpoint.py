"""models.checkpoint: safe loading of untrusted files, atomic saving, architecture checks."""
from __future__ import annotations

import os
import pickle
import shlex
import signal
import stat

import pytest
import torch

from core.files import default_file_mode, write_atomic
from models import CheckpointError, SimCLR, load_checkpoint, load_encoder, save_atomic
from models.checkpoint import describe_mismatch, encoder_checkpoint, encoder_config, infer_config, load_state_into


class RunsCode:
    """Unpickling this object runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}',)


def tiny(arch='resnet18', width=8, seed=0) -> SimCLR:
    torch.manual_seed(seed)
    return SimCLR(arch=arch, width=width)


def assert_one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert str(path) in message
    assert '\n' not in message
    return message


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- round trips ---------------------------------------------------------------------------------

def test_round_trip_keeps_everything(tmp_path):
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 32, 32))[1].sum().backward()
    optimizer.step()
    path = tmp_path / 'model_3.pth'
    save_atomic(encoder_checkpoint(model, optimizer, 3, args={'lr': 1e-3}), path)
    checkpoint = load_checkpoint(path)
    assert {'epoch', 'state_dict', 'optimizer'} <= set(checkpoint)
    assert checkpoint['epoch'] == 3 and checkpoint['args'] == {'lr': 1e-3}
    assert (checkpoint['arch'], checkpoint['width'], checkpoint['feature_dim']) == ('resnet18', 8, 128)
    assert_same_weights(checkpoint['state_dict'], model.state_dict())
    restored = torch.optim.Adam(tiny(seed=1).parameters(), lr=1e-3)
    restored.load_state_dict(checkpoint['optimizer'])
    assert torch.equal(restored.state_dict()['state'][0]['exp_avg'], optimizer.state_dict()['state'][0]['exp_avg'])
    assert sorted(os.listdir(tmp_path)) == ['model_3.pth']  # no temporary file left behind


def test_saved_file_has_ordinary_permissions(tmp_path):
    path = tmp_path / 'model_1.pth'
    save_atomic({'state_dict': {}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()


def test_save_creates_missing_folders(tmp_path):
    path = tmp_path / 'a' / 'b' / 'model_1.pth'
    save_atomic({'epoch': 1, 'state_dict': {'w': torch.ones(2)}, 'optimizer': {}}, path)
    assert torch.equal(load_checkpoint(path)['state_dict']['w'], torch.ones(2))


def test_bare_state_dict_is_accepted(tmp_path):
    model = tiny(width=16)
    path = tmp_path / 'bare.pth'
    save_atomic(model.state_dict(), path)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {'state_dict'}
    loaded, _ = load_encoder(path)
    assert loaded.config == {'arch': 'resnet18', 'width': 16, 'feature_dim': 128}
    assert_same_weights(loaded.state_dict(), model.state_dict())


# --- refusals ------------------------------------------------------------------------------------

def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'epoch': 1, 'state_dict': tiny().state_dict(), 'optimizer': {}, 'payload': RunsCode(marker)},
               path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = assert_one_line_naming(error, path)
    assert 'refused' in message
    with pytest.raises(CheckpointError):
        load_encoder(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the file is malicious: an unsafe load runs it
    assert marker.exists()


def test_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'state_dict': RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / 'nowhere' / 'model_1.pth'
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert 'no such' in assert_one_line_naming(error, path)


@pytest.mark.parametrize('content', ['truncated', 'garbage', 'empty'])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / 'model_1.pth'
    save_atomic(encoder_checkpoint(tiny(), None, 1), path)
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'garbage': os.urandom(4096), 'empty': b''}[content])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize('obj', [torch.ones(3), [torch.ones(3)], {'epoch': 1, 'optimizer': {}}])
def test_not_a_checkpoint_dict(tmp_path, obj):
    path = tmp_path / 'odd.pth'
    save_atomic(obj, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, path)


def test_not_an_encoder(tmp_path):
    path = tmp_path / 'probe.pth'
    save_atomic({'fc1.weight': torch.ones(2, 2)}, path)
    with pytest.raises(CheckpointError) as error:
        load_encoder(path)
    assert 'f.f.0.weight' in assert_one_line_naming(error, path)


# --- architecture checks -------------------------------------------------------------------------

def test_resnet34_checkpoint_into_resnet18(tmp_path):
    path = tmp_path / 'r34.pth'
    save_atomic(tiny('resnet34').state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_state_into(tiny('resnet18'), load_checkpoint(path)['state_dict'], path)
    message = assert_one_line_naming(error, path)
    assert 'unexpected' in message and 'f.f.3.2.' in message and 'resnet18' in message
    with pytest.raises(CheckpointError) as error:
        load_encoder(path, arch='resnet18')
    assert 'resnet34' in assert_one_line_naming(error, path)


def test_width_mismatch_names_the_first_shapes(tmp_path):
    path = tmp_path / 'wide.pth'
    save_atomic(tiny(width=16).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_state_into(tiny(width=8), load_checkpoint(path)['state_dict'], path)
    message = assert_one_line_naming(error, path)
    assert 'f.f.0.weight (16, 3, 3, 3) vs expected (8, 3, 3, 3)' in message
    assert message.count('vs expected') == 3  # the first few differences, not all of them


def test_describe_mismatch_lists_missing_and_unexpected():
    expected = {'a': torch.zeros(1), 'b': torch.zeros(2)}
    found = {'b': torch.zeros(3), 'c': torch.zeros(1)}
    assert describe_mismatch(expected, found) == (
        "missing ['a'], unexpected ['c'], shape b (3,) vs expected (2,)")
    assert describe_mismatch(expected, dict(expected)) == ''


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50'])
def test_infer_config_of_original_style_checkpoints(arch):
    with torch.device('meta'):
        state_dict = SimCLR(arch=arch).state_dict()
    assert infer_config(state_dict) == {'arch': arch, 'width': 64, 'feature_dim': 128}
    original = {'epoch': 200, 'state_dict': state_dict, 'optimizer': {}}  # no config keys
    assert encoder_config(original, 'model_200.pth') == {'arch': arch, 'width': 64, 'feature_dim': 128}


def test_original_resnet18_checkpoint_reads_as_resnet18():
    with torch.device('meta'):
        state_dict = SimCLR().state_dict()
    config = encoder_config({'epoch': 1, 'state_dict': state_dict, 'optimizer': {}}, 'x.pth')
    assert config == {'arch': 'resnet18', 'width': 64, 'feature_dim': 128}
    with pytest.raises(CheckpointError, match='x.pth.*resnet50'):
        encoder_config({'state_dict': state_dict}, 'x.pth', arch='resnet50')


@pytest.mark.parametrize('arch, width, feature_dim, record_config', [
    ('resnet34', 8, 128, True), ('resnet34', 8, 128, False), ('resnet18', 16, 64, False),
    ('resnet18', 8, 128, True), ('resnet50', 8, 128, False)])
def test_load_encoder_rebuilds_the_architecture(tmp_path, arch, width, feature_dim, record_config):
    torch.manual_seed(0)
    model = SimCLR(feature_dim=feature_dim, arch=arch, width=width).eval()
    path = tmp_path / 'model.pth'
    if record_config:
        save_atomic(encoder_checkpoint(model, None, 5), path)
    else:  # the original's layout: nothing but the weights
        save_atomic({'epoch': 5, 'state_dict': model.state_dict(), 'optimizer': {}}, path)
    loaded, checkpoint = load_encoder(path)
    assert loaded.config == {'arch': arch, 'width': width, 'feature_dim': feature_dim}
    assert checkpoint['epoch'] == 5
    assert_same_weights(loaded.state_dict(), model.state_dict())
    if arch == 'resnet18':
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), model(x))


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.'])
def test_wrapper_prefix_is_stripped(tmp_path, prefix):
    model = tiny()
    path = tmp_path / 'wrapped.pth'
    save_atomic({'epoch': 1, 'state_dict': {prefix + k: v for k, v in model.state_dict().items()},
                 'optimizer': {}}, path)
    loaded, _ = load_encoder(path)
    assert loaded.config['width'] == 8
    assert_same_weights(loaded.state_dict(), model.state_dict())


# --- atomic writing ------------------------------------------------------------------------------

class Killed(BaseException):
    """Stands in for a SIGKILL/KeyboardInterrupt arriving in the middle of torch.save."""


def half_save(obj, handle, *args, **kwargs):
    handle.write(b'PK\x03\x04 partial checkpoint bytes')
    raise Killed


def test_kill_during_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'model_1.pth'
    save_atomic({'epoch': 1, 'state_dict': {'w': torch.ones(3)}, 'optimizer': {}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, 'save', half_save)
    with pytest.raises(Killed):
        save_atomic({'epoch': 2, 'state_dict': {'w': torch.zeros(3)}, 'optimizer': {}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)['epoch'] == 1
    assert sorted(os.listdir(tmp_path)) == ['model_1.pth']


def test_kill_during_first_save_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, 'save', half_save)
    with pytest.raises(Killed):
        save_atomic({'state_dict': {}}, tmp_path / 'model_1.pth')
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_save_waits_for_the_file(tmp_path, monkeypatch):
    """A Ctrl-C arriving inside torch.save is held back until the file is complete, then raised."""
    real_save = torch.save

    def save_interrupted_midway(obj, handle):
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread at once
        real_save(obj, handle)

    monkeypatch.setattr(torch, 'save', save_interrupted_midway)
    path = tmp_path / 'model_3.pth'
    with pytest.raises(KeyboardInterrupt):
        save_atomic({'epoch': 3, 'state_dict': {'w': torch.arange(4.0)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)['epoch'] == 3
    assert sorted(os.listdir(tmp_path)) == ['model_3.pth']
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_save_without_interrupt_keeps_the_default_handler(tmp_path):
    save_atomic({'state_dict': {}}, tmp_path / 'a.pth')
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_failing_save_is_not_lost(tmp_path, monkeypatch):
    """The write fails (a full disk, say) after the user pressed Ctrl-C: the interrupt wins, the failure is
    its context, and no temporary file is left."""
    def interrupted_then_disk_full(obj, handle):
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', interrupted_then_disk_full)
    with pytest.raises(KeyboardInterrupt) as caught:
        save_atomic({'state_dict': {}}, tmp_path / 'model_1.pth')
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_write_atomic_puts_the_checked_file_in_place_with_a_plain_files_mode(tmp_path):
    path = tmp_path / 'sub' / 'file.bin'
    seen = []
    write_atomic(path, lambda handle: handle.write(b'new'), check=lambda tmp: seen.append(tmp.read_bytes()))
    assert path.read_bytes() == b'new' and seen == [b'new']
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()
    assert sorted(os.listdir(path.parent)) == ['file.bin']


@pytest.mark.parametrize('fail_in', ['write', 'check'])
def test_write_atomic_that_fails_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, fail_in):
    path = tmp_path / 'file.bin'
    path.write_bytes(b'old')

    def fail(*_):
        raise ValueError('broken')
    write = fail if fail_in == 'write' else (lambda handle: handle.write(b'new'))
    with pytest.raises(ValueError, match='broken'):
        write_atomic(path, write, check=fail if fail_in == 'check' else None)
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['file.bin']
