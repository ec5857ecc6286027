"""Time of lowbit's weighted k-means (`lowbit.algos.kmeans`) on Gaussian vectors, and its distortion
against the best scalar quantizer at the same rate, as a ratio (Lloyd-Max's MSE of N(0, 1) at b
bits, computed here by Lloyd's algorithm on the same data, one dimension at a time).

    python -m bench.kmeans [--points 1000000] [--dim 8] [--centroids 4096] [--iters 12]

Lloyd's iterations run on every point (`sample` = all), so the time is the full problem's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from lowbit.algos.kmeans import assign, kmeans

from .common import machine, markdown_table, write_results


def scalar_lloyd_mse(x: torch.Tensor, levels: int, iters: int = 50) -> float:
    """MSE of the Lloyd-Max scalar quantizer with `levels` levels, fitted on the values of `x`."""
    v = x.reshape(-1)[: 1 << 20].double()
    q = torch.quantile(v, (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    for _ in range(iters):
        idx = (v[:, None] - q[None]).abs().argmin(1)
        q = torch.stack([v[idx == k].mean() if (idx == k).any() else q[k] for k in range(levels)])
    return float((v - q[(v[:, None] - q[None]).abs().argmin(1)]).pow(2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--centroids", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=12)
    args = ap.parse_args()
    x = torch.randn(args.points, args.dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    c = kmeans(x, args.centroids, iters=args.iters, sample=args.points)
    seconds = time.perf_counter() - start
    mse = float((x - c[assign(x, torch.ones_like(x), c)]).pow(2).mean())
    bits = math.log2(args.centroids) / args.dim  # bits per dimension
    levels = round(2**bits)
    rows = [{"points": args.points, "dim": args.dim, "centroids": args.centroids, "iters": args.iters,
             "seconds": seconds, "bits_per_dim": bits, "mse": mse}]
    if abs(2**bits - levels) < 1e-9:
        rows[0]["scalar_mse"] = scalar_lloyd_mse(x, levels)
        rows[0]["mse_ratio_to_scalar"] = mse / rows[0]["scalar_mse"]
    print(markdown_table(rows, [("points", "points", "d"), ("dim", "dim", "d"), ("centroids", "centroids", "d"),
                                ("iters", "iterations", "d"), ("seconds", "seconds", ".1f"), ("bits_per_dim", "bits / dim", ".3f"),
                                ("mse", "MSE", ".4f"), ("scalar_mse", "Lloyd-Max scalar MSE", ".4f"),
                                ("mse_ratio_to_scalar", "MSE / scalar", ".3f")]))
    print(f"results: {write_results('kmeans', {'settings': vars(args), 'machine': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
