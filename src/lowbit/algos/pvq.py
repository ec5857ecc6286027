"""Pyramid vector quantization of a layer (`formats.pvq`; van der Ouderaa et al., 2024, "Pyramid
Vector Quantization for LLMs").

1. Row scales: each row's largest N-vector norm over the 2^B - 1 amplitude codes (fp16), so the
   amplitude grid covers every vector of the row without clipping.
2. Direction: the pyramid point nearest in angle to the vector (Fischer's PVQ search, as in the
   Opus codec): pulses placed in proportion to |x| (rounded down), then the remaining ones one at
   a time where they raise the correlation <|x|, y> / ||y||_2 most.
3. Amplitude: the vector's projection <x, y / ||y||_2> (the least-squares gain along the chosen
   direction), rounded onto the row's grid.
4. `gptq`: the same, inside GPTQ's error feedback (`algos.vector_gptq`), N columns at a time, so
   each vector's error is compensated by the columns after it (the paper's Hessian-aware step);
   `rtn`: every vector on its own.
"""

from __future__ import annotations

import torch

from ..formats import round_to_fp16
from ..formats.pvq import PVQFormat
from ..qtensor import PVQWeight
from .gptq import GPTQConfig
from .vector_gptq import vector_gptq


def pyramid_search(x: torch.Tensor, pulses: int) -> torch.Tensor:
    """Pyramid points [n, N] int64 (sum |y| = `pulses`) nearest in angle to the rows of `x: [n, N]`."""
    ax = x.abs().double()
    n, dim = ax.shape
    total = ax.sum(1, keepdim=True)
    zero = total[:, 0] == 0
    y = torch.floor(ax * pulses / torch.where(zero[:, None], torch.ones_like(total), total)).to(torch.int64)
    y[zero] = 0
    y[zero, 0] = pulses  # an all-zero vector: any point; its amplitude will be 0
    left = pulses - y.sum(1)  # < N after rounding down
    xy = (ax * y).sum(1)
    yy = (y * y).sum(1).double()
    for _ in range(dim):
        todo = left > 0
        if not bool(todo.any()):
            break
        score = (xy[:, None] + ax).pow(2) / (yy[:, None] + 2 * y + 1)  # correlation^2 after one more pulse at i
        best = score.argmax(1)
        rows = torch.nonzero(todo).squeeze(1)
        pick = best[rows]
        xy[rows] += ax[rows, pick]
        yy[rows] += 2 * y[rows, pick] + 1
        y[rows, pick] += 1
        left[rows] -= 1
    return torch.where(x < 0, -y, y)


def _amplitude_scales(w: torch.Tensor, fmt: PVQFormat) -> torch.Tensor:
    """[out] fp16-exact: the row's largest vector norm / (2^B - 1) (1 for an all-zero row)."""
    norms = w.reshape(w.shape[0], -1, fmt.dim).norm(dim=2)  # [out, in/N]
    top = norms.max(1).values / (2**fmt.amp_bits - 1)
    return round_to_fp16(torch.where(top > 0, top, torch.ones_like(top)))


def pvq_quantize(w: torch.Tensor, fmt: PVQFormat, hessian: torch.Tensor | None = None, method: str = "gptq",
                 config: GPTQConfig = GPTQConfig()) -> PVQWeight:
    """`w: [out, in]`, `hessian: [in, in]` (2 X^T X / n; needed by gptq)."""
    out_f, in_f = w.shape
    fmt.check_width(in_f)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method {method!r} does not quantize onto pyramid vectors (rtn or gptq)")
    if method == "gptq" and hessian is None:
        raise ValueError("gptq onto pyramid vectors needs the layer's Hessian")
    w = w.float()
    d, top = fmt.dim, 2**fmt.amp_bits - 1
    scales = _amplitude_scales(w, fmt)  # [out]
    n_vec = in_f // d
    index = torch.empty(out_f, n_vec, dtype=torch.int64)
    amps = torch.empty(out_f, n_vec, dtype=torch.uint8)

    def quantize_vectors(j: int, sub: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = pyramid_search(sub, fmt.pulses)  # [out, N]
        u = fmt.directions(y)
        amp = torch.clamp(torch.round((sub * u).sum(1) / scales), 0, top)  # [out]
        index[:, j] = fmt.encode(y)
        amps[:, j] = amp.to(torch.uint8)
        return u * (amp * scales)[:, None]

    if method == "gptq":
        vector_gptq(w, hessian, d, quantize_vectors, config)
    else:  # every vector on its own: all at once
        vecs = w.reshape(-1, d)  # [out * in/N, N]
        y = pyramid_search(vecs, fmt.pulses)
        gain = (vecs * fmt.directions(y)).sum(1) / scales.repeat_interleave(n_vec)
        index = fmt.encode(y).reshape(out_f, n_vec)
        amps = torch.clamp(torch.round(gain), 0, top).to(torch.uint8).reshape(out_f, n_vec)
    return PVQWeight(index, amps, scales, fmt)
