"""Losses of the pipeline as pure functions of tensors (docs/DESIGN.md §4.2, §5.1, §6.3).

Every function works on any device and in float32 or float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(out_1: torch.Tensor, out_2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of two batches of L2-normalised projections, each (B, D).

    With o = cat(out_1, out_2) of shape (2B, D) and j(i) the other view of sample i:
        L = mean_i -log( exp(o_i·o_j(i)/τ) / Σ_{k≠i} exp(o_i·o_k/τ) )

    Computed in log space (logsumexp) rather than as the original's ratio of exponentials; the value
    is the same, without overflow for small τ.
    """
    batch = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)  # (2B, D)
    logits = out @ out.t() / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=out.device)
    logits = logits.masked_fill(self_mask, float('-inf'))  # drop k = i from the denominator
    positive = (out_1 * out_2).sum(dim=-1) / temperature  # (B,)
    positive = torch.cat([positive, positive], dim=0)  # (2B,)
    return (torch.logsumexp(logits, dim=-1) - positive).mean()


def nt_xent_anchors(out_1: torch.Tensor, out_2: torch.Tensor, temperature: float, anchors: slice) -> torch.Tensor:
    """NT-Xent averaged over some anchors only: the rows `anchors` of out_1 and the same rows of out_2.

    out_1, out_2 (B, D) are the whole batch, o = cat(out_1, out_2) (2B, D); with A the 2a anchor rows of o,
        L_A = mean_{i ∈ A} -log( exp(o_i·o_j(i)/τ) / Σ_{k≠i} exp(o_i·o_k/τ) )
    Every row of the batch still serves as a negative. With every row an anchor this is `nt_xent`; over equal,
    disjoint slices covering the batch, the mean of the L_A is `nt_xent`. Under torchrun each process takes
    its own samples of the gathered global batch as anchors (common.distributed.nt_xent).
    """
    batch = out_1.shape[0]
    rows = torch.arange(batch, device=out_1.device)[anchors]  # (a,)
    anchor_rows = torch.cat([rows, rows + batch])  # (2a,) indices into o
    out = torch.cat([out_1, out_2], dim=0)  # (2B, D)
    logits = out[anchor_rows] @ out.t() / temperature  # (2a, 2B)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(anchor_rows), device=out.device), anchor_rows] = True
    logits = logits.masked_fill(self_mask, float('-inf'))  # drop k = i from the denominator
    positive = (out_1[anchors] * out_2[anchors]).sum(dim=-1) / temperature  # (a,)
    positive = torch.cat([positive, positive], dim=0)  # (2a,)
    return (torch.logsumexp(logits, dim=-1) - positive).mean()


def attention_map(fm: torch.Tensor, p: float = 2, eps: float = 1e-6) -> torch.Tensor:
    """A(F) = Σ_c |F_c|^p / (‖Σ_c |F_c|^p‖₂ over H,W + eps): (B, C, H, W) -> (B, 1, H, W)."""
    am = fm.abs().pow(p).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    norm = torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    return am / (norm + eps)


def attention_transfer(fm_s: torch.Tensor, fm_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention-transfer loss AT(s, t) = mean((A(s) − A(t))²) (Zagoruyko & Komodakis; docs/DESIGN.md §6.3).

    `fm_s` and `fm_t` are (B, C, H, W) feature maps (channel counts may differ); the teacher side
    is detached, so no gradient ever reaches the teacher.
    """
    return F.mse_loss(attention_map(fm_s, p), attention_map(fm_t.detach(), p))


def negative_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """−mean_b cos(a_b, b_b) for (B, D) inputs, which need not be normalised.

    The BadEncoder losses L0, L1, L2 (docs/DESIGN.md §5.1) and MIMIC's clone loss (§6.3) are all of this form.
    """
    return -(F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1).mean()
