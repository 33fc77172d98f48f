"""The MI estimator of MIMIC §6.1 (MINE / Donsker–Varadhan) and the layer weights of §6.2."""
import math

import pytest
import torch

from models.mutual_info import (MI_LAST_EPOCHS, NonFiniteCounts, StatisticsNetwork, clipped_mean, count_nonfinite,
                                dv_estimates, dv_lower_bound, estimate_mi, evaluate_mi, layer_weights,
                                nonfinite_warning)


def naive_dv(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """The textbook formula, as the original wrote it: mean(T_joint) − log(mean(exp(T_marginal)))."""
    return t_joint.mean() - torch.log(torch.exp(t_marginal).mean())


def correlated_gaussians(rho: float, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_d), y = ρx + sqrt(1−ρ²)ε: true I(x; y) = −½·d·log(1−ρ²)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=generator)
    return x, y


def true_mi(rho: float, d: int) -> float:
    return -0.5 * d * math.log(1 - rho ** 2)


# d = 2, 2000 samples, batch 200, 20 epochs: about 4 s per estimate on one busy CPU core. The middle
# estimate (true MI 1.022 nats) must come within 25% of the truth; seen: 0.92-0.99 over seeds.
MIDDLE_TOLERANCE = 0.25


def test_dv_estimator_orders_correlations_and_is_close_to_the_truth():
    d, rhos = 2, (0.5, 0.8, 0.95)  # true MI 0.288, 1.022, 2.328 nats
    estimates = []
    for rho in rhos:
        x, y = correlated_gaussians(rho, n=2000, d=d, seed=0)
        torch.manual_seed(0)  # the statistics network's initialisation
        mi, history = estimate_mi(x, y, epochs=20, batch_size=200, generator=torch.Generator().manual_seed(0))
        assert len(history) == 20 and all(v >= 0 for v in history)
        estimates.append(mi)
    assert estimates[0] < estimates[1] < estimates[2], estimates
    truth = true_mi(rhos[1], d)
    assert abs(estimates[1] - truth) <= MIDDLE_TOLERANCE * truth, (estimates[1], truth)


def test_independent_variables_give_almost_no_information():
    x, _ = correlated_gaussians(0.0, n=1000, d=2, seed=1)
    _, y = correlated_gaussians(0.0, n=1000, d=2, seed=2)
    torch.manual_seed(0)
    mi, _ = estimate_mi(x, y, epochs=5, batch_size=200, generator=torch.Generator().manual_seed(0))
    assert 0 <= mi < 0.1


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-7), (torch.float32, 2e-4)])
def test_dv_lower_bound_matches_the_naive_formula(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    t_joint = torch.randn(256, 1, generator=generator, dtype=torch.float64) * 3 + 1
    t_marginal = torch.randn(256, 1, generator=generator, dtype=torch.float64) * 3
    reference = naive_dv(t_joint, t_marginal).item()  # float64 throughout
    value = dv_lower_bound(t_joint.to(dtype), t_marginal.to(dtype))
    assert value.dtype == dtype and value.shape == ()
    assert abs(value.item() - reference) <= tolerance


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_dv_lower_bound_is_stable_for_large_statistics(dtype):
    generator = torch.Generator().manual_seed(1)
    small = torch.randn(128, generator=generator, dtype=torch.float64)
    t_joint, t_marginal = 1000 + small.flip(0), 1000 + small  # exp(1000) overflows even float64
    assert not torch.isfinite(naive_dv(t_joint.to(dtype), t_marginal.to(dtype)))
    expected = (t_joint.mean() - 1000 - torch.log(torch.exp(small).mean())).item()
    value = dv_lower_bound(t_joint.to(dtype), t_marginal.to(dtype))
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(expected, abs=1e-3 if dtype == torch.float32 else 1e-9)


def test_dv_lower_bound_gradient_is_finite_for_large_statistics():
    t_marginal = torch.full((64,), 500.0, requires_grad=True)
    t_joint = torch.full((64,), 501.0, requires_grad=True)
    dv_lower_bound(t_joint, t_marginal).backward()
    assert torch.isfinite(t_marginal.grad).all() and torch.isfinite(t_joint.grad).all()
    assert torch.allclose(t_marginal.grad, torch.full((64,), -1 / 64))  # softmax of equal values


def test_statistics_network_shape():
    network = StatisticsNetwork(h_dim=10, z_dim=3)
    assert network(torch.zeros(5, 10), torch.zeros(5, 3)).shape == (5, 1)
    assert network.dense1.in_features == 13 and network.dense1.out_features == 512


def test_mi_is_the_mean_of_the_last_ten_epoch_estimates():
    x, y = correlated_gaussians(0.9, n=64, d=2, seed=3)
    torch.manual_seed(0)
    epochs = MI_LAST_EPOCHS + 2
    mi, history = estimate_mi(x, y, epochs=epochs, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert len(history) == epochs
    assert mi == pytest.approx(sum(history[-10:]) / 10)
    assert mi != pytest.approx(sum(history) / epochs)  # the first two epochs are left out


def test_evaluate_mi_counts_negative_batches_as_zero():
    """A statistic that scores shuffled pairs higher than true pairs gives a negative bound: clipped to 0."""
    network = StatisticsNetwork(h_dim=1, z_dim=1, hidden=2)
    with torch.no_grad():  # T(h, z) = relu(h − z) + relu(z − h) = |h − z|: large for mismatched pairs
        network.dense1.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        network.dense1.bias.zero_()
        network.dense2.weight.copy_(torch.eye(2))
        network.dense2.bias.zero_()
        network.dense3.weight.copy_(torch.tensor([[1.0, 1.0]]))
        network.dense3.bias.zero_()
    h = torch.linspace(-3, 3, 64).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    assert dv_lower_bound(network(h, h), network(h, h.flip(0))) < 0
    assert evaluate_mi(network, h, h.clone(), batch_size=16, generator=generator) == 0.0


def test_clipped_mean_counts_negative_and_non_finite_batches_as_zero():
    values = [1.0, -2.0, float('nan'), float('inf'), float('-inf'), 3.0]
    assert clipped_mean(values) == pytest.approx(4.0 / 6)  # +inf too: it would make MI_l infinite
    assert count_nonfinite(values) == 3
    assert count_nonfinite([0.0, -1.0, 2.5]) == 0


def test_evaluate_mi_of_a_nan_statistics_network_is_zero_and_every_batch_is_counted():
    network = StatisticsNetwork(h_dim=2, z_dim=2, hidden=4)
    with torch.no_grad():
        network.dense3.weight.fill_(float('nan'))  # what a NaN training step leaves behind
    h, z = correlated_gaussians(0.9, n=40, d=2, seed=4)
    values = dv_estimates(network, h, z, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert len(values) == 3 and all(math.isnan(v) for v in values)  # batches of 16, 16, 8
    assert evaluate_mi(network, h, z, batch_size=16, generator=torch.Generator().manual_seed(0)) == 0.0


def nan_in_last_batch(n: int = 64, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated pairs whose last batch of h holds a NaN: its training loss is NaN in every epoch."""
    h, z = correlated_gaussians(0.9, n=n, d=2, seed=5)
    h[n - batch_size + 3, 1] = float('nan')
    return h, z


def test_estimate_mi_reports_non_finite_losses_and_estimates_per_epoch():
    h, z = nan_in_last_batch()
    counts = NonFiniteCounts()
    torch.manual_seed(0)
    result = estimate_mi(h, z, epochs=3, batch_size=16, generator=torch.Generator().manual_seed(0),
                         nonfinite=counts)
    mi, history = result  # still (MI, history) for every caller
    assert len(result) == 2 and mi == 0.0 and history == [0.0, 0.0, 0.0]  # silently 0 without the report
    # epoch 0: three finite steps, then the NaN batch; its NaN gradient turns the network NaN, so every batch
    # of every estimate, and every later loss, is NaN
    assert counts.batches == 4
    assert counts.losses == [1, 4, 4] and counts.estimates == [4, 4, 4]
    assert counts.total_losses == 9 and counts.total_estimates == 12 and counts
    line = counts.warning('layer5')
    assert line == nonfinite_warning('layer5', 12, 9)
    assert '\n' not in line and line.startswith('warning: MI of layer5: 12 batch estimate(s) were NaN or infinite')
    assert '9 training loss(es)' in line and 'unreliable' in line


def test_nonfinite_warning_only_when_something_was_not_finite():
    assert nonfinite_warning('layer3', 0, 0) == ''
    assert nonfinite_warning('layer3', 0, 2).startswith('warning: MI of layer3: 0 batch')
    assert nonfinite_warning('layer4', 5, 0).startswith('warning: MI of layer4: 5 batch')


def test_estimate_mi_counts_nothing_on_finite_data_and_is_unchanged_by_the_report():
    h, z = correlated_gaussians(0.9, n=64, d=2, seed=3)
    torch.manual_seed(0)
    plain = estimate_mi(h, z, epochs=3, batch_size=32, generator=torch.Generator().manual_seed(0))
    counts = NonFiniteCounts(estimates=[7], losses=[7])  # a reused object is reset
    torch.manual_seed(0)
    reported = estimate_mi(h, z, epochs=3, batch_size=32, generator=torch.Generator().manual_seed(0),
                           nonfinite=counts)
    assert reported == plain and plain[0] > 0
    assert counts.estimates == [0, 0, 0] and counts.losses == [0, 0, 0] and counts.batches == 2
    assert not counts and counts.warning('layer3') == ''


def test_layer_weights_follow_spec():
    opt, weights, fell_back = layer_weights([1.0, 2.0, 3.0, 4.0], [1000, 1000, 1000, 1000])
    assert not fell_back
    assert weights == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert opt == pytest.approx([2000, 3000, 4000, 5000])  # base + 10000·w
    opt, weights, _ = layer_weights([0.5, 0.0, 0.5, 0.0], [1, 2, 3, 4])
    assert weights == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert opt == pytest.approx([5001, 2, 5003, 4])


@pytest.mark.parametrize('mi_values', [[0.0, 0.0, 0.0, 0.0], [float('nan')] * 4])
def test_layer_weights_fall_back_to_uniform(mi_values):
    opt, weights, fell_back = layer_weights(mi_values, [1000, 500, 1000, 1000])
    assert fell_back
    assert weights == [0.25] * 4
    assert opt == pytest.approx([3500, 3000, 3500, 3500])
    assert all(math.isfinite(o) for o in opt)


def test_layer_weights_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match='3 MI values for 4'):
        layer_weights([1.0, 2.0, 3.0], [1000] * 4)
