"""Weighted k-nearest-neighbour classification on cosine similarity of frozen features.

Each of the k nearest training features votes for its label with weight exp(sim / T), T = 0.07 (the
kNN monitor of Wu et al. 2018, used by DINO and solo-learn). Cheap; no training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int, num_classes: int,
                temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, num_classes]."""
    train_n, k = F.normalize(train_f.float(), dim=1), min(k, train_f.shape[0])
    scores = []
    for start in range(0, test_f.shape[0], chunk):
        sim = F.normalize(test_f[start:start + chunk].float(), dim=1) @ train_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hit.float().mean()) * 100.0


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor, k: int,
                 num_classes: int) -> dict[str, float]:
    scores = knn_predict(train_f, train_y, test_f, k, num_classes)
    return {"top1": topk_accuracy(scores, test_y, 1), "top5": topk_accuracy(scores, test_y, 5)}
