"""SSL-Cleanse (defences/sslcleanse.py): its loss and its learning-rate schedule by hand."""
from __future__ import annotations

import pytest
import torch

from defences.sslcleanse import lr_factor, norm_mse, sslcleanse_loss


def test_norm_mse_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert norm_mse(a, 2 * a).item() == pytest.approx(0.0, abs=1e-7)
    assert norm_mse(a, -a).item() == pytest.approx(4.0)
    assert norm_mse(a, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item() == pytest.approx(1.0)  # cos 0 and 1


def test_sslcleanse_loss_by_hand():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, terms = sslcleanse_loss(e1, e1, (e1, e2), (e2, e2))  # clean pair agrees; trigger: f differs, g agrees
    assert terms['loss_clean'].item() == pytest.approx(0.0, abs=1e-7)
    assert terms['loss_trigger'].item() == pytest.approx((2 + 0) / 6)
    assert loss.item() == pytest.approx(2 / 6)
    loss, terms = sslcleanse_loss(e1, e2, (e1, e1), (e1, e1), clean_weight=0.5, trigger_weight=3.0)
    assert terms['loss_clean'].item() == pytest.approx(2 * 2 / 6) and loss.item() == pytest.approx(0.5 * 4 / 6)


def test_sslcleanse_lr_factor_follows_the_code():
    assert lr_factor(0, 0, 500) == pytest.approx(1 / 500) and lr_factor(499, 3, 500) == 1.0  # warm-up
    assert [lr_factor(10_000, epoch, 500) for epoch in (449, 450, 474, 475)] == \
        pytest.approx([1.0, 0.2, 0.2, 0.04])  # ×0.2 for the last 50 epochs, again for the last 25
    assert [lr_factor(10_000, epoch, 40) for epoch in (14, 15, 39)] == pytest.approx([1.0, 0.2, 0.2])  # 40 − 50 < 0
    assert lr_factor(0, 0, 10, warmup_steps=0) == 1.0
