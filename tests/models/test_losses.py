"""Losses, the DV bound and kNN against the original (naive) implementations, written out here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.knn import knn_predict
from models.losses import attention_map, attention_transfer, negative_cosine, nt_xent
from models.mutual_info import dv_lower_bound

TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4}
DTYPES = [torch.float64, torch.float32]


# --- the original formulas, as the paper-era code wrote them -----------------------------------

def original_nt_xent(out_1, out_2, temperature):
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    sim_matrix = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = (torch.ones_like(sim_matrix) - torch.eye(2 * batch_size, device=sim_matrix.device)).bool()
    sim_matrix = sim_matrix.masked_select(mask).view(2 * batch_size, -1)
    pos_sim = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos_sim = torch.cat([pos_sim, pos_sim], dim=0)
    return (-torch.log(pos_sim / sim_matrix.sum(dim=-1))).mean()


def original_attention_map(fm, p=2, eps=1e-6):
    am = torch.pow(torch.abs(fm), p)
    am = torch.sum(am, dim=1, keepdim=True)
    norm = torch.norm(am, dim=(2, 3), keepdim=True)
    return torch.div(am, norm + eps)


def original_attention_transfer(fm_s, fm_t, p=2):
    return F.mse_loss(original_attention_map(fm_s, p), original_attention_map(fm_t, p))


def original_clone_loss(a, b):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return -torch.sum(a * b, dim=-1).mean()


def original_dv(t0, t1):
    return t0.mean() - torch.log(torch.mean(torch.exp(t1)))


def original_knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):
    sim_matrix = torch.mm(feature, feature_bank)
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot_label = torch.zeros(feature.size(0) * knn_k, classes, device=sim_labels.device,
                                dtype=sim_weight.dtype)
    one_hot_label = one_hot_label.scatter(dim=-1, index=sim_labels.view(-1, 1), value=1.0)
    pred_scores = torch.sum(one_hot_label.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(dim=-1),
                            dim=1)
    return pred_scores.argsort(dim=-1, descending=True)


# --- helpers -------------------------------------------------------------------------------------

def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def assert_matches(value, expected, dtype):
    assert value.dtype == dtype and value.shape == expected.shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(value, expected, rtol=0, atol=tolerance)


# --- NT-Xent -------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('temperature', [0.5, 0.1])
def test_nt_xent_matches_original(dtype, temperature):
    out_1 = F.normalize(randn(16, 32, dtype=dtype, seed=1), dim=-1)
    out_2 = F.normalize(out_1 + 0.5 * randn(16, 32, dtype=dtype, seed=2), dim=-1)
    assert_matches(nt_xent(out_1, out_2, temperature), original_nt_xent(out_1, out_2, temperature), dtype)


def test_nt_xent_gradient_matches_original():
    out_1 = F.normalize(randn(8, 16, dtype=torch.float64, seed=3), dim=-1).requires_grad_()
    out_2 = F.normalize(randn(8, 16, dtype=torch.float64, seed=4), dim=-1)
    ours = torch.autograd.grad(nt_xent(out_1, out_2, 0.5), out_1)[0]
    reference = torch.autograd.grad(original_nt_xent(out_1, out_2, 0.5), out_1)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


def test_nt_xent_stays_finite_where_the_original_overflows():
    out_1 = F.normalize(randn(8, 16, dtype=torch.float32, seed=5), dim=-1)
    temperature = 0.005  # exp(1/τ) = exp(200) overflows float32
    assert not torch.isfinite(original_nt_xent(out_1, out_1, temperature))
    loss = nt_xent(out_1, out_1, temperature)
    expected = original_nt_xent(out_1.double(), out_1.double(), temperature)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)


def test_nt_xent_prefers_matching_views():
    out_1 = F.normalize(randn(16, 32, dtype=torch.float32, seed=6), dim=-1)
    unrelated = F.normalize(randn(16, 32, dtype=torch.float32, seed=7), dim=-1)
    assert nt_xent(out_1, out_1, 0.5) < nt_xent(out_1, unrelated, 0.5)


# --- attention transfer --------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('channels_t', [8, 16])
def test_attention_transfer_matches_original(dtype, channels_t):
    student = randn(4, 8, 8, 8, dtype=dtype, seed=10)
    teacher = randn(4, channels_t, 8, 8, dtype=dtype, seed=11)
    assert_matches(attention_transfer(student, teacher), original_attention_transfer(student, teacher), dtype)
    assert_matches(attention_transfer(student, teacher, p=1), original_attention_transfer(student, teacher, 1),
                   dtype)


def test_attention_map_shape_and_norm():
    am = attention_map(randn(3, 5, 6, 7, dtype=torch.float64, seed=12))
    assert am.shape == (3, 1, 6, 7)
    torch.testing.assert_close(am.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_attention_transfer_passes_no_gradient_to_the_teacher():
    student = randn(2, 4, 8, 8, dtype=torch.float64, seed=13).requires_grad_()
    teacher = randn(2, 4, 8, 8, dtype=torch.float64, seed=14).requires_grad_()
    attention_transfer(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_attention_transfer_is_zero_for_equal_maps():
    maps = randn(2, 4, 8, 8, dtype=torch.float64, seed=15)
    assert attention_transfer(maps, 3 * maps).item() == pytest.approx(0, abs=1e-12)  # up to eps
    assert attention_transfer(maps, randn(2, 4, 8, 8, dtype=torch.float64, seed=16)).item() > 1e-6


# --- negative cosine (BadEncoder losses, MIMIC clone loss) ---------------------------------------

@pytest.mark.parametrize('dtype', DTYPES)
def test_negative_cosine_matches_original_on_unnormalised_inputs(dtype):
    scale = torch.linspace(0.1, 20, 16, dtype=torch.float64).to(dtype)[:, None]
    a = randn(16, 64, dtype=dtype, seed=20) * scale
    b = randn(16, 64, dtype=dtype, seed=21) + a
    assert_matches(negative_cosine(a, b), original_clone_loss(a, b), dtype)
    assert_matches(negative_cosine(3 * a, 0.5 * b), negative_cosine(a, b), dtype)


def test_negative_cosine_extremes():
    a = randn(8, 16, dtype=torch.float64, seed=22)
    assert negative_cosine(a, 2 * a).item() == pytest.approx(-1, abs=1e-12)
    assert negative_cosine(a, -a).item() == pytest.approx(1, abs=1e-12)


# --- Donsker-Varadhan bound ----------------------------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(64, 1), (64,)])
def test_dv_lower_bound_matches_original(dtype, shape):
    t_joint = randn(*shape, dtype=dtype, seed=30) + 1
    t_marginal = randn(*shape, dtype=dtype, seed=31)
    assert_matches(dv_lower_bound(t_joint, t_marginal), original_dv(t_joint, t_marginal), dtype)


def test_dv_lower_bound_is_stable_for_large_statistics():
    t_joint = randn(64, 1, dtype=torch.float32, seed=32) + 100
    t_marginal = randn(64, 1, dtype=torch.float32, seed=33) + 95
    assert not torch.isfinite(original_dv(t_joint, t_marginal))  # exp(95) overflows float32
    value = dv_lower_bound(t_joint, t_marginal)
    torch.testing.assert_close(value.double(), original_dv(t_joint.double(), t_marginal.double()),
                               rtol=0, atol=2e-4)


def test_dv_lower_bound_gradient_matches_original():
    t_joint = randn(32, 1, dtype=torch.float64, seed=34).requires_grad_()
    t_marginal = randn(32, 1, dtype=torch.float64, seed=35).requires_grad_()
    ours = torch.autograd.grad(dv_lower_bound(t_joint, t_marginal), (t_joint, t_marginal))
    reference = torch.autograd.grad(original_dv(t_joint, t_marginal), (t_joint, t_marginal))
    for g_ours, g_ref in zip(ours, reference):
        torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


# --- weighted kNN --------------------------------------------------------------------------------

def knn_inputs(dtype, n_bank=200, n_query=24, dim=16, classes=10, seed=40):
    bank = F.normalize(randn(n_bank, dim, dtype=dtype, seed=seed), dim=-1)
    labels = torch.randint(0, classes, (n_bank,), generator=generator(seed + 1))
    queries = F.normalize(bank[:n_query] + 0.3 * randn(n_query, dim, dtype=dtype, seed=seed + 2), dim=-1)
    return queries, bank.t().contiguous(), labels


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('knn_k', [1, 5, 200])
def test_knn_predict_matches_original(dtype, knn_k):
    queries, bank, labels = knn_inputs(dtype)
    ours = knn_predict(queries, bank, labels, 10, knn_k, 0.5)
    reference = original_knn_predict(queries, bank, labels, 10, knn_k, 0.5)
    assert ours.shape == (24, 10) and ours.dtype == torch.int64
    assert torch.equal(ours[:, 0], reference[:, 0])
    if knn_k == 200:  # every class has votes, so the full ranking is free of ties
        assert torch.equal(ours, reference)
    assert torch.equal(ours.sort(dim=1).values, torch.arange(10).expand(24, -1))  # a permutation per row


def test_knn_predict_caps_k_at_the_bank_size():
    queries, bank, labels = knn_inputs(torch.float64, n_bank=20, n_query=12)
    capped = knn_predict(queries, bank, labels, 10, 500, 0.5)
    torch.testing.assert_close(capped, original_knn_predict(queries, bank, labels, 10, 20, 0.5), rtol=0, atol=0)


def test_knn_predict_finds_the_nearest_class():
    bank = torch.eye(3, dtype=torch.float64)  # (D=3, N=3): one entry per axis
    labels = torch.tensor([2, 0, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0]], dtype=torch.float64), dim=-1)
    assert knn_predict(queries, bank, labels, 3, 1, 0.1)[:, 0].tolist() == [2, 1]


def test_knn_predict_accepts_int32_labels():
    queries, bank, labels = knn_inputs(torch.float32)
    torch.testing.assert_close(knn_predict(queries, bank, labels.int(), 10, 20, 0.5),
                               knn_predict(queries, bank, labels, 10, 20, 0.5))
