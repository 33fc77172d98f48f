"""Encoders trained on un-normalised pixels (stage 0's --no_normalize, CTRL's code): recorded in every checkpoint
down the pipeline, and fed such pixels by every stage."""
from __future__ import annotations

import torch

import MIMIC
import defences.mimic
import baseline_defence
import train_clean_encoder as stage0
import training_downstream_classifier as stage3
from datasets import get_info
from models import RAW_INPUTS, SimCLR, input_normalization, load_checkpoint, load_encoder


def test_input_normalization_is_none_for_raw_encoders_and_the_set_s_otherwise():
    normalization = get_info('synthetic_shapes').normalization
    assert input_normalization(SimCLR(width=8), normalization) == normalization
    assert input_normalization(SimCLR(width=8, raw_inputs=True), normalization) == RAW_INPUTS == ((0.0,) * 3,
                                                                                                  (1.0,) * 3)
    assert 'raw_inputs' not in SimCLR(width=8).config  # every other checkpoint keeps its keys


def test_no_normalize_is_recorded_and_kept_by_mimic_and_the_baselines(data_root, trigger_file, reference_file,
                                                                      tmp_path, monkeypatch):
    stage0.main(['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root), '--width', '8',
                 '--batch_size', '64', '--epochs', '1', '--num_workers', '0', '--device', 'cpu', '--no_progress',
                 '--no_normalize', '--knn-k', '5', '--results_dir', str(tmp_path / 'ctrl')])
    encoder, checkpoint = load_encoder(tmp_path / 'ctrl' / 'model_1.pth')
    assert checkpoint['raw_inputs'] is True and encoder.raw_inputs

    seen, locate = [], defences.mimic.locate_benign_knowledge
    monkeypatch.setattr(defences.mimic, 'locate_benign_knowledge', lambda *args, **kwargs: seen.append(args[2]) or
                        locate(*args, **kwargs))
    MIMIC.main(['--pretraining_dataset', 'synthetic_shapes', '--data_root', str(data_root), '--teacher',
                str(tmp_path / 'ctrl' / 'model_1.pth'), '--ratio', '0.25', '--batch_size', '32', '--epochs', '1',
                '--mi_epochs', '1',
                '--num_workers', '0', '--device', 'cpu', '--no_progress', '--results_dir', str(tmp_path / 'mimic')])
    assert seen == [RAW_INPUTS]  # the MI step (and the distillation's run) see raw pixels
    assert load_checkpoint(tmp_path / 'mimic' / 'model1.pth')['raw_inputs'] is True
    baseline_defence.main(['--defence', 'kd', '--pretraining_dataset', 'synthetic_shapes', '--data_root',
                           str(data_root), '--teacher', str(tmp_path / 'ctrl' / 'model_1.pth'), '--ratio', '0.25',
                           '--batch_size', '32', '--epochs', '1', '--num_workers', '0', '--device', 'cpu',
                           '--no_progress', '--results_dir', str(tmp_path / 'kd')])
    assert load_checkpoint(tmp_path / 'kd' / 'model_1.pth')['raw_inputs'] is True

    used = []
    extract = stage3.extract_features
    monkeypatch.setattr(stage3, 'extract_features', lambda encoder, data, normalization, *rest:
                        used.append(normalization) or extract(encoder, data, normalization, *rest))
    stage3.main(['--dataset', 'synthetic_digits', '--data_root', str(data_root), '--trigger_file', str(trigger_file),
                 '--reference_file', str(reference_file), '--encoder', str(tmp_path / 'mimic' / 'model1.pth'),
                 '--encoder_usage_info', 'synthetic_shapes', '--device', 'cpu', '--no_progress', '--nn_epochs', '1'])
    assert used == [RAW_INPUTS]
    assert torch.is_tensor(encoder.f.f[0].weight)
