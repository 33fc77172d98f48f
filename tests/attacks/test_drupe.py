"""attacks/drupe.py: DRUPE's terms on hand-made inputs with known values, its phases, weights and cost schedule."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attacks import drupe

SCHEDULE = drupe.Schedule()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- sliced Wasserstein

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_swd_of_identical_sets_is_zero(dtype):
    x = torch.randn(40, 16, generator=generator(1), dtype=dtype)
    assert drupe.sliced_wasserstein(x, x, 50, generator()).item() == 0
    # The order of the points does not matter: each projection is sorted.
    assert drupe.sliced_wasserstein(x, x[torch.randperm(40, generator=generator(2))], 50, generator()).item() == \
        pytest.approx(0, abs=1e-6)


def test_swd_in_one_dimension_is_the_wasserstein_distance():
    """d = 1: every direction is ±1, so SW_2 is W_2 of the sorted values, whatever the projections."""
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0], [0.0]])  # sorted: (0, 3) against (0, 1): W_2² = (0² + 2²)/2 = 2
    assert drupe.sliced_wasserstein(x, y, 7, generator()).item() == pytest.approx(math.sqrt(2))
    assert drupe.sliced_wasserstein(x, y, 7, generator(), p=1).item() == pytest.approx(1.0)  # (0 + 2)/2
    assert drupe.sliced_wasserstein(x, x + 3, 5, generator()).item() == pytest.approx(3.0)


def test_swd_of_a_shifted_set_is_the_rms_projection_of_the_shift():
    """y = x + v shifts every projection by θ·v: SW_2² = mean_k (θ_k·v)² → E(θ·v)² = ‖v‖²/d for θ uniform."""
    d = 4
    x = torch.randn(64, d, generator=generator(3), dtype=torch.float64)
    v = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=torch.float64)  # ‖v‖ = 5
    estimate = drupe.sliced_wasserstein(x, x + v, 20000, generator(4)).item()
    assert estimate == pytest.approx(5 / math.sqrt(d), rel=0.02)
    # Never more than the shift itself: |θ·v| ≤ ‖v‖ for unit θ.
    assert drupe.sliced_wasserstein(x, x + v, 3, generator(5)).item() <= 5 + 1e-9


def test_swd_scales_with_the_sets_and_follows_its_generator():
    x = torch.randn(30, 8, generator=generator(6))
    y = torch.randn(30, 8, generator=generator(7)) + 1
    base = drupe.sliced_wasserstein(x, y, 10, generator(8))
    assert drupe.sliced_wasserstein(2.5 * x, 2.5 * y, 10, generator(8)).item() == pytest.approx(2.5 * base.item())
    assert drupe.sliced_wasserstein(x, y, 10, generator(8)).item() == base.item()  # same directions, same value
    assert drupe.sliced_wasserstein(x, y, 10, generator(9)).item() != base.item()  # other directions
    with pytest.raises(ValueError, match='one shape'):
        drupe.sliced_wasserstein(x, y[:20], 10, generator())


def test_swd_passes_gradients_to_both_sets():
    x = torch.randn(16, 4, generator=generator(10), requires_grad=True)
    y = torch.randn(16, 4, generator=generator(11), requires_grad=True)
    drupe.sliced_wasserstein(x, y, 8, generator()).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


# -------------------------------------------------------------------------- effectiveness and spread

def test_reference_similarities_pair_copies_with_references():
    e1, e2, e3 = torch.eye(3)
    reference = torch.stack([e1, 2 * e2])  # (R=2, d=3); norms do not matter
    shared = torch.stack([e1, e1 + e2, e3])[None]  # (C=1, B=3, d): one copy for every reference
    expected = torch.tensor([[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), 0.0]])
    torch.testing.assert_close(drupe.reference_similarities(shared, reference), expected)
    per_reference = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e2])])  # (C=R=2, B=2, d)
    torch.testing.assert_close(drupe.reference_similarities(per_reference, reference),
                               torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_nearest_reference_loss_and_balance():
    similarities = torch.tensor([[1.0, 0.0], [0.5, 0.8]])  # (R=2, B=2)
    assert drupe.nearest_reference_loss(similarities).item() == pytest.approx(-(1.0 + 0.8) / 2)
    # Means per reference 0.5 and 0.65; unbiased std of two values = |a − b|/√2.
    assert drupe.reference_balance(similarities).item() == pytest.approx(0.15 / math.sqrt(2))
    assert drupe.reference_balance(torch.full((3, 4), 0.7)).item() == pytest.approx(0.0)


def test_pairwise_similarity_excludes_self_pairs():
    e1, e2 = torch.eye(2)
    features = torch.stack([e1, 3 * e1, e2])  # pairs: (0,1) cos 1, (0,2) 0, (1,2) 0 -> mean 1/3
    assert drupe.pairwise_similarity(features).item() == pytest.approx(1 / 3)
    assert drupe.pairwise_similarity(torch.stack([e1, e1])).item() == pytest.approx(1.0)
    assert drupe.pairwise_similarity(torch.stack([e1, -e1])).item() == pytest.approx(-1.0)
    # Leading dims (the triggered copies) are averaged: (1/3 + 1)/2.
    both = torch.stack([features, torch.stack([e2, e2, e2])])
    assert drupe.pairwise_similarity(both).item() == pytest.approx(2 / 3)
    random = torch.randn(2, 7, 5, generator=generator(12))  # against the plain double loop
    z = torch.nn.functional.normalize(random, dim=-1)
    loop = [torch.dot(z[c, i], z[c, j]) for c in range(2) for i in range(7) for j in range(7) if i != j]
    assert drupe.pairwise_similarity(random).item() == pytest.approx(torch.stack(loop).mean().item(), abs=1e-6)


def test_reference_similarity_includes_self_pairs():
    e1, e2, _ = torch.eye(3)
    assert drupe.reference_similarity(torch.stack([e1, e2])).item() == pytest.approx((1 + 0 + 1) / 3)
    assert drupe.reference_similarity(torch.stack([e1, 2 * e1, 5 * e1])).item() == pytest.approx(1.0)
    assert drupe.reference_similarity(torch.stack([e1, -e1])).item() == pytest.approx((1 - 1 + 1) / 3)


def test_feature_spread_is_the_mean_per_dimension_std():
    features = torch.tensor([[0.0, 10.0], [2.0, 10.0]])  # stds (unbiased) √2 and 0
    assert drupe.feature_spread(features).item() == pytest.approx(math.sqrt(2) / 2)


def test_drupe_terms_of_a_shifted_triggered_set():
    """Triggered = clean + v in one dimension: swd = |v|, swd_rel = |v| / std; the other terms as defined."""
    clean = torch.tensor([[1.0], [2.0], [4.0]])
    triggered = (clean + 3)[None]  # (C=1, B=3, d=1), every value positive: all cosines 1
    reference = torch.tensor([[1.0], [-2.0]])
    terms = drupe.drupe_terms(clean, triggered, reference, generator(), 4)
    assert set(terms) == {'loss0', *drupe.TERMS}
    assert terms['swd'].item() == pytest.approx(3.0)
    assert terms['swd_rel'].item() == pytest.approx(3.0 / clean.std().item())
    assert terms['loss0'].item() == pytest.approx(-1.0)  # the nearest reference is r_1 for every input
    assert terms['spread_std'].item() == pytest.approx(2 / math.sqrt(2))  # means 1 and −1
    assert terms['trigger_sim'].item() == pytest.approx(1.0)
    assert terms['reference_sim'].item() == pytest.approx(1 / 3)  # (1 − 1 + 1)/3


# -------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize('epoch, phase', [(1, 'warmup'), (2, 'attack'), (4, 'attack'), (5, 'preserve'),
                                          (120, 'preserve')])
def test_phase_of_at_drupes_boundaries(epoch, phase):
    assert drupe.phase_of(epoch, SCHEDULE) == phase
    assert drupe.phase_of(epoch, replace(SCHEDULE, warmup_epochs=0, preserve_from=2)) == \
        ('attack' if epoch == 1 else 'preserve')


@pytest.mark.parametrize('phase, reference_sim, expected', [
    ('warmup', 0.1, 0.3), ('warmup', 0.3, 0.5),
    ('attack', 0.3, 0.0), ('attack', 0.45, 0.2), ('attack', 0.6, 1.0), ('preserve', 0.5, 0.2)])
def test_reference_sim_weight(phase, reference_sim, expected):
    assert drupe.reference_sim_weight(phase, reference_sim, SCHEDULE) == pytest.approx(expected)


def test_term_weights_per_phase():
    warmup = drupe.term_weights('warmup', 0.1, 0.001, 0.5, 0.3, 1.0, 2.0, SCHEDULE)
    assert warmup == {'loss0': 0.0, 'loss1': 1.0, 'loss2': 2.0, 'spread_std': 0.0, 'trigger_sim': 0.0,
                      'swd_rel': 0.0, 'reference_sim': 0.5}
    attack = drupe.term_weights('attack', 0.1, 0.001, 0.5, 0.45, 1.0, 1.0, SCHEDULE)
    assert attack == {**warmup, 'loss0': 1.0, 'loss2': 1.0, 'spread_std': 2.0, 'reference_sim': 0.2}
    calm = drupe.term_weights('preserve', 0.2, 0.003, 0.05, 0.3, 1.0, 1.0, SCHEDULE)
    assert calm == pytest.approx({'loss0': 1.0, 'loss1': 1.0, 'loss2': 1.0, 'spread_std': 0.2 + 0.5,
                                  'trigger_sim': 0.2, 'swd_rel': 0.003, 'reference_sim': 0.0})
    uneven = drupe.term_weights('preserve', 0.2, 0.003, 0.15, 0.6, 1.0, 1.0, SCHEDULE)
    assert uneven['spread_std'] == pytest.approx(0.2 + 0.5 + 1.5) and uneven['reference_sim'] == 1.0


def test_weighted_loss_sums_the_weighted_terms_only():
    terms = {'loss0': torch.tensor(-0.9), 'loss1': torch.tensor(-0.8), 'swd': torch.tensor(100.0)}
    assert drupe.weighted_loss(terms, {'loss0': 1.0, 'loss1': 0.5}).item() == pytest.approx(-1.3)


ON_TARGET = {'loss0': -0.97, 'loss1': -0.95, 'loss2': -0.95, 'trigger_sim': 0.55, 'swd': 2.0}


def test_meets_targets():
    assert drupe.meets_targets(ON_TARGET, SCHEDULE)
    for name, value in [('loss0', -0.95), ('loss1', -0.85), ('loss2', -0.9)]:
        assert not drupe.meets_targets({**ON_TARGET, name: value}, SCHEDULE), name


def test_costs_stay_fixed_until_adapt_after():
    state = drupe.initial_state(SCHEDULE)
    assert state == drupe.DrupeState(0.1, 0.001)
    for epoch in (1, 5, 20):
        assert drupe.end_of_epoch(state, epoch, ON_TARGET, SCHEDULE) == state


def test_costs_rise_on_target_and_fall_off_it():
    state = drupe.initial_state(SCHEDULE)
    up = drupe.end_of_epoch(state, 21, ON_TARGET, SCHEDULE)
    assert (up.cost_spread, up.cost_dist) == pytest.approx((0.1 * 1.25, 0.001 * 1.25))
    assert up.best_epoch == 0  # candidates come after epoch 24
    down = drupe.end_of_epoch(up, 22, {**ON_TARGET, 'loss0': -0.5}, SCHEDULE)
    assert (down.cost_spread, down.cost_dist) == pytest.approx((0.125 / 1.25 ** 1.25, 0.00125 / 1.25 ** 1.25))
    # On target but still concentrated (s_trig ≥ 0.6): c rises, c_D falls.
    mixed = drupe.end_of_epoch(state, 21, {**ON_TARGET, 'trigger_sim': 0.7}, SCHEDULE)
    assert (mixed.cost_spread, mixed.cost_dist) == pytest.approx((0.125, 0.001 / 1.25 ** 1.25))


def test_spread_out_enough_skips_the_next_raise_of_c():
    state = drupe.initial_state(SCHEDULE)
    spread = {**ON_TARGET, 'trigger_sim': 0.4}
    first = drupe.end_of_epoch(state, 21, spread, SCHEDULE)
    assert first.cost_spread == pytest.approx(0.125) and first.up == -1
    second = drupe.end_of_epoch(first, 22, ON_TARGET, SCHEDULE)  # the counter only gets back to 0
    assert second.cost_spread == pytest.approx(0.125) and second.cost_dist == pytest.approx(0.001 * 1.25 ** 2)
    third = drupe.end_of_epoch(second, 23, ON_TARGET, SCHEDULE)
    assert third.cost_spread == pytest.approx(0.125 * 1.25)


def test_best_candidate_is_the_smallest_swd_after_select_after():
    state = drupe.initial_state(SCHEDULE)
    history = [(24, 0.5, True), (25, 3.0, True), (26, 2.0, True), (27, 1.0, False), (28, 2.5, True)]
    for epoch, swd, on_target in history:
        means = {**ON_TARGET, 'swd': swd, 'loss0': -0.99 if on_target else -0.5}
        state = drupe.end_of_epoch(state, epoch, means, SCHEDULE)
    # Epoch 24 is too early and epoch 27 missed its targets, however small their swd.
    assert (state.best_epoch, state.best_swd) == (26, 2.0)
    concentrated = drupe.end_of_epoch(state, 29, {**ON_TARGET, 'swd': 0.1, 'trigger_sim': 0.65}, SCHEDULE)
    assert concentrated.best_epoch == 26
