"""kNN monitor (docs/DESIGN.md §4.4) and the downstream MLP probe (§7)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def knn_predict(feature: torch.Tensor, feature_bank: torch.Tensor, feature_labels: torch.Tensor,
                classes: int, knn_k: int, knn_t: float) -> torch.Tensor:
    """Weighted kNN (InstDisc): labels (B, classes) sorted by vote, best first.

    `feature` (B, D) and `feature_bank` (D, N) are L2-normalised; `feature_labels` (N,). Each of the
    k most similar bank entries votes exp(sim/τ) for its label. k is capped at N.
    """
    sim_matrix = feature @ feature_bank  # (B, N)
    sim_weight, sim_indices = sim_matrix.topk(k=min(knn_k, feature_bank.shape[1]), dim=-1)  # (B, K)
    sim_labels = torch.gather(feature_labels.expand(feature.shape[0], -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot = F.one_hot(sim_labels.long(), classes).to(sim_weight.dtype)  # (B, K, C); any integer labels
    pred_scores = (one_hot * sim_weight.unsqueeze(-1)).sum(dim=1)  # (B, C)
    return pred_scores.argsort(dim=-1, descending=True)


class MLPProbe(nn.Module):
    """Linear(d, h1) → ReLU → Dropout(0.5) → Linear(h1, h2) → ReLU → Linear(h2, C).

    Parameter names (fc1, fc2, fc3) follow the original `NeuralNet`.
    """

    def __init__(self, input_size: int, hidden_sizes: tuple[int, int], num_classes: int):
        super().__init__()
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(input_size, hidden_sizes[0])
        self.fc2 = nn.Linear(hidden_sizes[0], hidden_sizes[1])
        self.fc3 = nn.Linear(hidden_sizes[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(x)))
