"""Mutual information between a tapped layer and the representation (MIMIC §6.1, MINE / DV bound).

The measured network is frozen and its input un-augmented, so the pairs (h, z) are fixed: they are
computed once and the statistics networks train on the cached tensors.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

MI_WEIGHT_SCALE = 10000  # opt_l = base_l + 10000 · w_l (MIMIC's "momentum_opt")
MI_LAST_EPOCHS = 10  # MI_l is the mean of the last 10 epoch estimates


def dv_lower_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker–Varadhan bound I_DV = mean(T_joint) − log mean(exp(T_marginal)).

    `t_joint` holds T(h_b, z_b) and `t_marginal` T(h_b, z_π(b)), any shape. The log-mean-exp is
    computed stably as logsumexp − log N (the original's `log(exp(T).mean())` overflows for T > 88).
    """
    n = t_marginal.numel()
    return t_joint.mean() - (torch.logsumexp(t_marginal.reshape(-1), dim=0) - math.log(n))


class StatisticsNetwork(nn.Module):
    """T(h, z): MLP [h ‖ z] → 512 → ReLU → 512 → ReLU → 1 (layer names as the original `TNet`)."""

    def __init__(self, h_dim: int, z_dim: int, hidden: int = 512):
        super().__init__()
        self.dense1 = nn.Linear(h_dim + z_dim, hidden)
        self.dense2 = nn.Linear(hidden, hidden)
        self.dense3 = nn.Linear(hidden, 1)
        self.relu = nn.ReLU()

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h, z], dim=-1)  # (B, h_dim + z_dim)
        return self.dense3(self.relu(self.dense2(self.relu(self.dense1(x)))))  # (B, 1)


def dv_on_batch(network: StatisticsNetwork, h: torch.Tensor, z: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """I_DV of one batch, the marginal pairing z with a random permutation π of the batch."""
    permutation = torch.randperm(z.shape[0], generator=generator).to(z.device)
    return dv_lower_bound(network(h, z), network(h, z[permutation]))


def _batches(n: int, batch_size: int):
    """Consecutive slices over n items, the last one partial (the original's memory loader)."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_mi(network: StatisticsNetwork, h: torch.Tensor, z: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> float:
    """Mean of the per-batch DV estimates over the data; a negative or NaN batch counts as 0."""
    network.eval()
    values = []
    for batch in _batches(h.shape[0], batch_size):
        value = dv_on_batch(network, h[batch], z[batch], generator).item()
        values.append(0.0 if math.isnan(value) or value < 0 else value)
    return sum(values) / len(values)


def estimate_mi(h: torch.Tensor, z: torch.Tensor, *, epochs: int, batch_size: int,
                generator: torch.Generator, lr: float = 1e-3, weight_decay: float = 1e-5,
                on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, list[float]]:
    """Train a fresh statistics network on fixed pairs (h (N, Dh), z (N, Dz)) by maximising I_DV.

    Adam (lr 1e-3, weight decay 1e-5), `epochs` passes over the data in order, in batches of
    `batch_size`; after each epoch the bound is estimated over the data (see `evaluate_mi`).
    Returns (MI, per-epoch estimates), MI being the mean of the last 10 estimates (SPEC §6.1).
    """
    network = StatisticsNetwork(h.shape[1], z.shape[1]).to(device=h.device, dtype=h.dtype)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch in range(epochs):
        network.train()
        for batch in _batches(h.shape[0], batch_size):
            loss = -dv_on_batch(network, h[batch], z[batch], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append(evaluate_mi(network, h, z, batch_size, generator))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    tail = history[-MI_LAST_EPOCHS:]
    return sum(tail) / len(tail), history


def layer_weights(mi_values: Sequence[float], base: Sequence[float],
                  scale: float = MI_WEIGHT_SCALE) -> tuple[list[float], list[float], bool]:
    """Attention-loss weights from per-layer MI (SPEC §6.2): w_l = MI_l / Σ MI, opt_l = base_l + scale·w_l.

    Returns (opt, w, fell_back). When every MI is 0 the original divides 0 by 0 and trains on NaN;
    here w falls back to uniform (1/L) and `fell_back` is True so the caller can warn.
    """
    if len(mi_values) != len(base):
        raise ValueError(f'{len(mi_values)} MI values for {len(base)} base weights')
    total = float(sum(mi_values))
    fell_back = not total > 0
    if fell_back:
        weights = [1.0 / len(mi_values)] * len(mi_values)
    else:
        weights = [float(v) / total for v in mi_values]
    return [b + scale * w for b, w in zip(base, weights)], weights, fell_back
