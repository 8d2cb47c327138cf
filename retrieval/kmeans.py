"""Batched k-means of keys (one clustering per KV head), deterministic: no random init."""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, clusters: int, iters: int = 10) -> torch.Tensor:
    """Cluster labels `[heads, tokens]` of points `x` `[heads, tokens, dim]` into `clusters` groups.

    Centroids start at evenly spaced tokens (post-RoPE keys drift with position, so spreading the seeds
    over time covers the space better than a random draw and keeps runs reproducible).
    """
    heads, tokens, dim = x.shape
    if tokens == 0:
        return torch.empty(heads, 0, dtype=torch.long, device=x.device)
    clusters = max(1, min(clusters, tokens))
    xf = x.float()
    seeds = torch.linspace(0, tokens - 1, clusters, device=x.device).round().long()
    centroids = xf[:, seeds].clone()
    labels = torch.full((heads, tokens), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new = _assign(xf, centroids)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = _update(xf, labels, centroids)
    return labels


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 does not change the argmin.
    dist = (centroids * centroids).sum(-1)[:, None, :] - 2 * x @ centroids.transpose(1, 2)
    return dist.argmin(-1)


def _update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    heads, _, dim = x.shape
    k = centroids.shape[1]
    sums = torch.zeros(heads, k, dim, device=x.device).scatter_add_(1, labels[..., None].expand_as(x), x)
    counts = torch.zeros(heads, k, device=x.device).scatter_add_(
        1, labels, torch.ones_like(labels, dtype=x.dtype)
    )
    # An empty cluster keeps its old centroid instead of collapsing to zero.
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)


def groups(labels: torch.Tensor, max_size: int) -> list[torch.Tensor]:
    """Token indices of each non-empty cluster of one head (`labels` `[tokens]`), in token order, with
    clusters longer than `max_size` cut into consecutive pieces so any unit can fit a budget."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels).tolist()
    out = []
    for members in torch.split(order, counts):
        out.extend(members[i : i + max_size] for i in range(0, members.numel(), max_size))
    return [g for g in out if g.numel()]
