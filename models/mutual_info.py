"""Mutual information between a tapped layer and the representation (MINE / DV bound; docs/DESIGN.md §6.1).

The measured network is frozen and its input un-augmented, so the pairs (h, z) are fixed: they are
computed once and the statistics networks train on the cached tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

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
def dv_estimates(network: StatisticsNetwork, h: torch.Tensor, z: torch.Tensor, batch_size: int,
                 generator: torch.Generator) -> list[float]:
    """The DV bound of each batch of the data, in order, as computed (NaN and ±inf included)."""
    network.eval()
    return [dv_on_batch(network, h[batch], z[batch], generator).item() for batch in _batches(h.shape[0], batch_size)]


def clipped_mean(values: Sequence[float]) -> float:
    """Mean of per-batch estimates, a negative or non-finite one counted as 0 (docs/DESIGN.md §6.1).

    Not only NaN: a +inf batch would otherwise make MI_l infinite and the layer weights (docs/DESIGN.md §6.2) NaN.
    """
    return sum(v if math.isfinite(v) and v > 0 else 0.0 for v in values) / len(values)


def count_nonfinite(values: Iterable[float]) -> int:
    """How many of the values are NaN or ±inf."""
    return sum(not math.isfinite(v) for v in values)


def evaluate_mi(network: StatisticsNetwork, h: torch.Tensor, z: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> float:
    """Mean of the per-batch DV estimates over the data; a negative or non-finite batch counts as 0."""
    return clipped_mean(dv_estimates(network, h, z, batch_size, generator))


@dataclass
class NonFiniteCounts:
    """What `estimate_mi(..., nonfinite=counts)` met that was not a finite number, epoch by epoch.

    `estimates[e]`: batches of epoch e's estimate whose DV value was NaN or ±inf (each counted as 0 in the
    epoch's estimate, so a failing layer quietly reads as "no information"); `losses[e]`: training steps of
    epoch e whose loss was NaN or ±inf (the step is still taken, as in the original; its NaN gradient
    usually leaves the statistics network NaN from then on). `batches`: batches per epoch.
    """
    estimates: list[int] = field(default_factory=list)
    losses: list[int] = field(default_factory=list)
    batches: int = 0

    @property
    def total_estimates(self) -> int:
        return sum(self.estimates)

    @property
    def total_losses(self) -> int:
        return sum(self.losses)

    def __bool__(self) -> bool:
        return self.total_estimates + self.total_losses > 0

    def warning(self, layer: str) -> str:
        """One line for a layer whose estimation met non-finite values ('' when it met none)."""
        return nonfinite_warning(layer, self.total_estimates, self.total_losses)


def nonfinite_warning(layer: str, estimates: int, losses: int) -> str:
    """The warning for a layer whose MI estimation met `estimates` non-finite batch estimates and `losses`
    non-finite training losses ('' when none): one line, for the caller to print."""
    if not estimates and not losses:
        return ''
    return (f'warning: MI of {layer}: {estimates} batch estimate(s) were NaN or infinite (counted as 0) and '
            f'{losses} training loss(es) were; its MI, and so its layer weight, is unreliable')


def estimate_mi(h: torch.Tensor, z: torch.Tensor, *, epochs: int, batch_size: int,
                generator: torch.Generator, lr: float = 1e-3, weight_decay: float = 1e-5,
                on_epoch: Callable[[int, float], None] | None = None,
                nonfinite: NonFiniteCounts | None = None) -> tuple[float, list[float]]:
    """Train a fresh statistics network on fixed pairs (h (N, Dh), z (N, Dz)) by maximising I_DV.

    Adam (lr 1e-3, weight decay 1e-5), `epochs` passes over the data in order, in batches of
    `batch_size`; after each epoch the bound is estimated over the data (see `evaluate_mi`).
    Returns (MI, per-epoch estimates), MI being the mean of the last 10 estimates (docs/DESIGN.md §6.1).
    `nonfinite`, when given, is filled in with the non-finite batch estimates and training losses of
    every epoch (see `NonFiniteCounts`); the estimate is the same with or without it.
    """
    network = StatisticsNetwork(h.shape[1], z.shape[1]).to(device=h.device, dtype=h.dtype)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    batches = _batches(h.shape[0], batch_size)
    if nonfinite is not None:
        nonfinite.estimates, nonfinite.losses, nonfinite.batches = [], [], len(batches)
    history = []
    for epoch in range(epochs):
        network.train()
        bad_losses = torch.zeros((), dtype=torch.int64, device=h.device)  # summed on the device: no sync per step
        for batch in batches:
            loss = -dv_on_batch(network, h[batch], z[batch], generator)
            if nonfinite is not None:
                bad_losses += ~torch.isfinite(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        values = dv_estimates(network, h, z, batch_size, generator)
        history.append(clipped_mean(values))
        if nonfinite is not None:
            nonfinite.estimates.append(count_nonfinite(values))
            nonfinite.losses.append(int(bad_losses.item()))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    tail = history[-MI_LAST_EPOCHS:]
    return sum(tail) / len(tail), history


def layer_weights(mi_values: Sequence[float], base: Sequence[float],
                  scale: float = MI_WEIGHT_SCALE) -> tuple[list[float], list[float], bool]:
    """Attention-loss weights from per-layer MI (docs/DESIGN.md §6.2): w_l = MI_l / Σ MI, opt_l = base_l + scale·w_l.

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
