"""AUC and log-loss (exact, tie-aware; no extra dependency)."""

from __future__ import annotations

import torch

__all__ = ["auc", "logloss"]


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC via the rank-sum statistic; ties get their average rank. NaN with one class only."""
    labels = labels.double().flatten()
    scores = scores.double().flatten()
    n_pos = float(labels.sum())
    n_neg = float(labels.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[labels > 0.5].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: torch.Tensor, probs: torch.Tensor, eps: float = 1e-7) -> float:
    p = probs.double().flatten().clamp(eps, 1 - eps)
    y = labels.double().flatten()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
