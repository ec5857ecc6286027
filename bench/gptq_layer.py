"""Time per layer for RTN and GPTQ on one large linear layer (default 4096 x 4096, a 4096-dim
Hessian), as a ratio to RTN measured in the same run.

    python -m bench.gptq_layer [--size 4096] [--bits 4] [--group-size 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from lowbit.algos import GPTQConfig, gptq_quantize, rtn_quantize
from lowbit.formats import GroupLayout, get_grid

from .common import machine, markdown_table, write_results


def synthetic_layer(size: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [size, size] and a Hessian from correlated, heavy-ish activations [tokens, size]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(size, size, generator=gen) * 0.02
    mix = torch.randn(size, size, generator=gen) / size**0.5 + torch.eye(size)
    x = torch.randn(tokens, size, generator=gen) @ mix
    x[:, :8] *= 20  # a few outlier channels, as in LLM activations
    return w, 2 * x.T @ x / tokens


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / out: the layer's mean output error on the calibration inputs."""
    d = w - w_hat
    return (torch.einsum("oi,ij,oj->", d, h, d) / w.shape[0]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    w, h = synthetic_layer(args.size, args.tokens)
    grid = get_grid(f"int{args.bits}")
    layout = GroupLayout(args.size, args.size, args.group_size)
    runs = {
        "rtn": lambda: rtn_quantize(w, grid, layout),
        "gptq": lambda: gptq_quantize(w, h, grid, layout, GPTQConfig()),
        "gptq act-order": lambda: gptq_quantize(w, h, grid, layout, GPTQConfig(act_order=True)),
    }
    rows = []
    for name, fn in runs.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            qw = fn()
            times.append(time.perf_counter() - start)
        rows.append({"method": name, "seconds": min(times), "output_error": output_error(w, qw.dequantize(), h), "bpw": qw.bits_per_weight()})
    base = rows[0]["seconds"]
    for r in rows:
        r["seconds_ratio_to_rtn"] = r["seconds"] / base
        r["error_ratio_to_rtn"] = r["output_error"] / rows[0]["output_error"]
    table = markdown_table(rows, [
        ("method", "method", "s"), ("seconds", "s / layer", ".2f"), ("seconds_ratio_to_rtn", "time / RTN", ".1f"),
        ("output_error", "output error", ".4g"), ("error_ratio_to_rtn", "error / RTN", ".3f"), ("bpw", "bpw", ".4f"),
    ])
    print(f"one {args.size}x{args.size} layer, int{args.bits} g{args.group_size}, Hessian from {args.tokens} tokens")
    print(table)
    path = write_results("gptq_layer", {"settings": vars(args), "machine": machine(), "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
