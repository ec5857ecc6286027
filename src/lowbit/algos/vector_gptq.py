"""GPTQ's error feedback with d columns at a time, for quantizers that code d weights jointly
(vector codebooks, `algos.vq`; pyramid vectors, `algos.pvq`): GPTVQ (van Baalen et al., 2024)
and VPTQ's channel-independent second-order step.

At each step the caller's `quantize_vectors` gets the d columns as the error feedback of the
columns before them left them, and the inverse-Hessian weight of each column (1 / [U]_jj^2, U
the upper Cholesky factor of H^-1, as GPTQ weighs a column); it returns their quantized values
(and records its codes). Each column then pushes its error onto the columns not yet quantized,
lazily in blocks of 128 columns, as GPTQ does. Columns stay in their order (a vector is d
consecutive inputs), so there is no act-order.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gptq import GPTQConfig, _one_thread, inverse_hessian_cholesky

# (vector index j, columns [out, d] as fed back, column weights [out, d]) -> quantized [out, d]
QuantizeVectors = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def vector_gptq(w: torch.Tensor, hessian: torch.Tensor, d: int, quantize_vectors: QuantizeVectors,
                config: GPTQConfig = GPTQConfig()) -> None:
    """Run the loop over `w: [out, in]` with `hessian: [in, in]` (2 X^T X / n), d columns per step."""
    out_f, in_f = w.shape
    if in_f % d:
        raise ValueError(f"vectors of {d} do not tile width {in_f}")
    dead = torch.diag(hessian) == 0
    W = w.float().clone()
    W[:, dead] = 0.0
    hinv = inverse_hessian_cholesky(hessian, config.damp, None, dead)  # [in, in] upper
    block = max(d, config.block_size // d * d)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()  # [out, B]
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread():
            for j in range(0, i2 - i1, d):
                weights = (1.0 / torch.diag(hinv1)[j : j + d].pow(2)).expand(out_f, d)
                q = quantize_vectors((i1 + j) // d, W1[:, j : j + d], weights)  # [out, d]
                for t in range(d):  # each column's error onto the later columns, GPTQ's update
                    col = j + t
                    err = (W1[:, col] - q[:, t]) / hinv1[col, col]
                    W1[:, col:].addr_(err, hinv1[col, col:], alpha=-1.0)
                    err1[:, col] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
