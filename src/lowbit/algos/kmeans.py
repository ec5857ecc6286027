"""Weighted k-means in torch on the CPU: k-means++ seeding, then Lloyd iterations, each point's
dimensions weighted (VPTQ weighs a weight vector's entries by the Hessian diagonal of their input
channels, so the codebook spends its precision where the layer's output is sensitive).

Distances are computed a chunk of points at a time through matmuls, so a million 8-dim vectors
against 4096 centroids never form the full distance matrix. Deterministic for a given seed.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 15  # points per distance block


def weighted_sq_distances(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij (x_ij - c_kj)^2 for points `x, w: [n, d]` and centroids `c: [k, d]` -> [n, k]."""
    return (w * x * x).sum(1, keepdim=True) - 2 * (w * x) @ c.T + w @ (c * c).T


def assign(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every point (weighted distance): [n] int64."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], CHUNK):
        out[i : i + CHUNK] = weighted_sq_distances(x[i : i + CHUNK], w[i : i + CHUNK], c).argmin(1)
    return out


def _plusplus(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to the weighted
    squared distance to the nearest one chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(0, n, (1,), generator=gen))
    centroids = [x[first]]
    nearest = weighted_sq_distances(x, w, x[first : first + 1])[:, 0].clamp(min=0)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # fewer distinct points than centroids: repeat one
            centroids.append(x[int(torch.randint(0, n, (1,), generator=gen))])
            continue
        idx = int(torch.multinomial(nearest.double() / total, 1, generator=gen))
        centroids.append(x[idx])
        nearest = torch.minimum(nearest, weighted_sq_distances(x, w, x[idx : idx + 1])[:, 0].clamp(min=0))
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 12, seed: int = 0,
           init_sample: int = 1 << 12, sample: int = 1 << 15) -> torch.Tensor:
    """Centroids [k, d] of points `x: [n, d]` (float32), dimensions weighted by `weights: [n, d]`
    (None: all 1). The seeding runs on a random subset of at most `init_sample` points, Lloyd's
    iterations on one of at most `sample` points (a few hundred points per centroid fix it as well
    as all of them would, at a fraction of the time), stopping early once no point moves."""
    x = x.float()
    w = torch.ones_like(x) if weights is None else weights.float()
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means of no points")
    if n > sample:
        keep = torch.randperm(n, generator=gen)[:sample]
        x, w, n = x[keep], w[keep], sample
    seed_idx = torch.randperm(n, generator=gen)[:init_sample] if n > init_sample else torch.arange(n)
    c = _plusplus(x[seed_idx], w[seed_idx], k, gen)
    labels = None
    for _ in range(iters):
        new = assign(x, w, c)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        num = torch.zeros_like(c).index_add_(0, labels, w * x)
        den = torch.zeros_like(c).index_add_(0, labels, w)
        filled = den > 0
        c = torch.where(filled, num / den.clamp(min=1e-30), c)  # an empty centroid keeps its place
    return c
