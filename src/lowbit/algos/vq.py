"""Vector quantization of a layer onto a codebook format (`formats.vq`).

1. Row scales: each row of W divided by its RMS (fp16), so one codebook serves rows of any size.
2. Codebook: weighted k-means (`algos.kmeans`) of the scaled rows' d-vectors, each entry weighted
   by the Hessian diagonal of its input channel (VPTQ, Liu et al., 2024, "VPTQ: Extreme Low-bit
   Vector Post-Training Quantization for Large Language Models"), k-means++ seeded; fp16.
3. Assignment:
   - `rtn`: every vector to its nearest codeword (plain weighted distance);
   - `gptq`: GPTQ's error feedback with d columns at a time (GPTVQ, van Baalen et al., 2024;
     VPTQ's channel-independent second-order step): a vector goes to the codeword nearest under
     the inverse-Hessian metric (entry j weighted by 1 / [U]_jj^2, U the upper Cholesky factor of
     H^-1, as GPTQ weighs a column), then each of its columns pushes its error onto the columns
     not yet quantized, lazily in blocks of 128 columns, as GPTQ does. Columns stay in their
     order (a vector is d consecutive inputs), so there is no act-order.
4. Codebook refit (`gptq`): with the indices fixed, each codeword is re-solved as the weighted
   mean of the error-corrected vectors assigned to it, and the assignment redone once, which can
   only lower the k-means objective on those vectors.
"""

from __future__ import annotations

import torch

from ..formats import round_to_fp16
from ..formats.vq import VQFormat
from ..qtensor import VQWeight
from .gptq import GPTQConfig, _one_thread, inverse_hessian_cholesky
from .kmeans import assign, kmeans


def _row_scales(w: torch.Tensor) -> torch.Tensor:
    """[out] fp16-exact RMS of every row (a zero row gets 1)."""
    rms = w.pow(2).mean(1).sqrt()
    return round_to_fp16(torch.where(rms > 0, rms, torch.ones_like(rms)))


def vq_quantize(w: torch.Tensor, fmt: VQFormat, hessian: torch.Tensor | None = None, method: str = "gptq",
                config: GPTQConfig = GPTQConfig(), seed: int = 0) -> VQWeight:
    """`w: [out, in]`, `hessian: [in, in]` (2 X^T X / n; None: plain distances, method rtn only)."""
    out_f, in_f = w.shape
    fmt.check_width(in_f)
    d = fmt.dim
    if method == "gptq" and hessian is None:
        raise ValueError("gptq onto a vector codebook needs the layer's Hessian")
    w = w.float()
    scales = _row_scales(w)
    wn = w / scales[:, None]  # [out, in]
    diag = torch.ones(in_f) if hessian is None else torch.diag(hessian).float().clamp(min=0)
    diag = diag / diag.mean().clamp(min=1e-30) + 1e-6  # only the relative weights matter
    vec_w = diag.reshape(1, -1, d).expand(out_f, -1, -1).reshape(-1, d)  # [out * in/d, d]
    codebook = round_to_fp16(kmeans(wn.reshape(-1, d), fmt.codebook_size, vec_w, seed=seed))
    if method == "rtn":
        codes = assign(wn.reshape(-1, d), vec_w, codebook).reshape(out_f, in_f // d)
    elif method == "gptq":
        codes, targets = _vq_gptq(wn, hessian, codebook, d, config)
        codebook = round_to_fp16(_refit(targets.reshape(-1, d), vec_w, codes.reshape(-1), codebook))
        codes = assign(targets.reshape(-1, d), vec_w, codebook).reshape(out_f, in_f // d)
    else:
        raise ValueError(f"method {method!r} does not quantize onto a vector codebook (rtn or gptq)")
    return VQWeight(codes.to(torch.uint8), codebook, scales, fmt)


def _refit(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each codeword as the weighted mean of the points assigned to it (unused ones stay)."""
    num = torch.zeros_like(codebook).index_add_(0, labels, w * x)
    den = torch.zeros_like(codebook).index_add_(0, labels, w)
    return torch.where(den > 0, num / den.clamp(min=1e-30), codebook)


@torch.inference_mode()
def _vq_gptq(wn: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, d: int,
             config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop, d columns per step, onto `codebook`. Returns (codes [out, in/d] int64, the
    error-corrected values each vector had when it was assigned [out, in])."""
    out_f, in_f = wn.shape
    diag = torch.diag(hessian)
    dead = diag == 0
    W = wn.clone()
    W[:, dead] = 0.0
    hinv = inverse_hessian_cholesky(hessian, config.damp, None, dead)  # [in, in] upper
    codes = torch.empty(out_f, in_f // d, dtype=torch.int64)
    targets = torch.empty_like(W)
    block = max(d, config.block_size // d * d)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()  # [out, B]
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread():
            for j in range(0, i2 - i1, d):
                sub = W1[:, j : j + d]  # [out, d]
                weights = (1.0 / torch.diag(hinv1)[j : j + d].pow(2)).expand(out_f, d)
                idx = assign(sub, weights, codebook)
                codes[:, (i1 + j) // d] = idx
                targets[:, i1 + j : i1 + j + d] = sub
                q = codebook[idx]  # [out, d]
                for t in range(d):  # each column's error onto the later columns, GPTQ's update
                    col = j + t
                    err = (W1[:, col] - q[:, t]) / hinv1[col, col]
                    W1[:, col:].addr_(err, hinv1[col, col:], alpha=-1.0)
                    err1[:, col] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, targets
