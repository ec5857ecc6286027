"""PTQ1.61 (Zhao et al., 2025, "PTQ1.61: Push the Real Limit of Extremely Low-Bit Post-Training
Quantization Methods for Large Language Models"), in this form:

1. One-dimensional structured mask. The input channels with the largest mean squared activation
   (the calibration Hessian's diagonal, H_jj = 2 mean x_j^2) are salient: a fixed fraction
   (`salient_fraction`, default 0.2) of each layer's input channels, the same for every row, so
   the mask costs 1 bit per input channel (in / (out * in) bits per weight).
2. Binarization of the other channels with block-wise scaling factors: every binarized weight is
   sign * alpha[row, block] * beta[column] (blocks of `block_size` binarized columns per row, one
   per row by default; beta per input channel, shared by all rows, which carries the row-to-row
   correlated part of the magnitudes). The scales minimise the block's output reconstruction
   error tr((T - B) H (T - B)^T) by alternating minimisation: a Gauss-Seidel sweep over the
   blocks' alpha (each a closed-form 1-D least squares under the full H), then beta in closed
   form (the normal equations (H o C^T C) beta = diag(C^T T H), C = sign * alpha), `iters` times.
   The closed forms weigh every error by the calibration inputs, the "implicit row-wise
   correlations" that a plain mean|w| scale ignores. An addition of ours (`feedback`, default
   on): after that first fit the signs are chosen again one column at a time with GPTQ's error
   feedback through the inverse Hessian, and the scales refitted; on the reference model's
   layers this cuts the output error by about a third over sign(w).
3. Salient channels on a low-bit grid (default int4, per group along the salient channels, or per
   channel), with GPTQ on their Hessian block, after moving the binarization error onto them:
   their target is W_s + D_b H_bs H_ss^-1 (D_b = W_b - B, the binarization error), the
   error-optimal continuous correction given the binarized part (as GPTQ/OBS updates do). Then
   the binary scales (and signs) are fitted once more on W_b + D_s H_sb H_bb^-1, the correction
   for the salient part's own rounding error.

The paper's "quantization preprocessing" (a first PTQ pass, LoRA adapters trained over its
dequantized weights and merged, then PTQ again on the merged model) is not part of this per-layer
algorithm: it is the recipe's `preprocess` section (`algos.restorative_lora`,
`quantize.preprocess_model`), which works with any method. On the reference model it takes
PTQ1.61's KL to the original down by about 40% (see `bench.grids`' preprocessed rows).

Storage (`qtensor.PTQ161Weight`): mask, salient codes and parameters, signs, alpha, beta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import Grid, GroupLayout
from ..formats.base import round_to_fp16
from ..qtensor import PTQ161Weight, QuantizedWeight
from .gptq import GPTQConfig, _one_thread, gptq_quantize, inverse_hessian_cholesky
from .rtn import rtn_quantize


@dataclass(frozen=True)
class PTQ161Config:
    salient_fraction: float = 0.2  # of the input channels
    iters: int = 4  # alternating rounds of the binary scales
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (as GPTQ)
    salient_method: str = "gptq"  # "gptq" | "rtn": how the salient channels are rounded
    feedback: bool = True  # choose the binary signs with GPTQ-style error feedback (see fit_binary)
    gptq: GPTQConfig = GPTQConfig()


def salient_mask(hessian: torch.Tensor, n_salient: int) -> torch.Tensor:
    """[in] bool: the `n_salient` channels with the largest H_jj (the lower index first on a tie)."""
    score = torch.diagonal(hessian).double()
    order = torch.argsort(-score, stable=True)
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:n_salient]] = True
    return mask


def _alpha_sweep(t: torch.Tensor, p: torch.Tensor, alpha: torch.Tensor, h: torch.Tensor, block_size: int) -> torch.Tensor:
    """One Gauss-Seidel sweep over the blocks: alpha[:, b] minimising tr((T - B) H (T - B)^T) with
    B = p * alpha[:, block] (p = sign * beta: [out, k]), every other block held. Returns alpha."""
    k = t.shape[1]
    blk = torch.arange(k) // block_size
    alpha = alpha.clone()
    rh = (t - p * alpha[:, blk]) @ h  # [out, k]: residual times H, kept current
    tiny = torch.finfo(t.dtype).tiny
    for b in range(alpha.shape[1]):
        cols = slice(b * block_size, min((b + 1) * block_size, k))
        pb = p[:, cols]  # [out, kb]
        denom = ((pb @ h[cols, cols]) * pb).sum(dim=1).clamp_min(tiny)  # [out]
        delta = (rh[:, cols] * pb).sum(dim=1) / denom
        alpha[:, b] += delta
        rh -= (delta[:, None] * pb) @ h[cols, :]
    return alpha


def _beta_solve(t: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """beta [k] minimising tr((T - C diag(beta)) H (T - C diag(beta))^T), C = sign * alpha: [out, k]."""
    m = h * (c.T @ c)  # [k, k]: sum_r c_ri H_ij c_rj
    rhs = ((t @ h) * c).sum(dim=0)  # [k]
    m = m + torch.eye(m.shape[0], dtype=m.dtype) * 1e-8 * torch.diagonal(m).mean().clamp_min(1e-30)
    return torch.linalg.solve(m, rhs)


def feedback_signs(t: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, damp: float, block: int = 128) -> torch.Tensor:
    """Signs [out, k] (+-1) for `t: [out, k]` with fixed magnitudes `scale: [out, k]`, chosen one
    column at a time with the rounding error of each pushed onto the later columns through the
    inverse Hessian (GPTQ's update, on the binary grid {-scale, +scale} of every weight)."""
    hinv = inverse_hessian_cholesky(h.float(), damp).double()
    W = t.double().T.contiguous()  # [k, out]: one column of t per row
    S = scale.double().T
    signs = torch.empty_like(W)
    k = W.shape[0]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, err1 = W[i1:i2].clone(), torch.zeros(i2 - i1, W.shape[1], dtype=W.dtype)
        with _one_thread():
            for i in range(i2 - i1):
                sg = torch.where(W1[i] >= 0, 1.0, -1.0).double()
                signs[i1 + i] = sg
                err = (W1[i] - sg * S[i1 + i]) / hinv[i1 + i, i1 + i]
                W1[i:].addr_(hinv[i1 + i, i1 + i : i2], err, alpha=-1.0)
                err1[i] = err
        W[i2:] -= hinv[i1:i2, i2:].T @ err1
    return signs.T


def fit_binary(
    t: torch.Tensor, h: torch.Tensor, block_size: int, iters: int, feedback: bool = True, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binarize `t: [out, k]` under `h: [k, k]` (positive definite): signs [out, k] uint8 (1: +),
    alpha [out, n_blocks] and beta [k], both fp16-exact float32 (see the module docstring).
    `feedback`: after the first fit, choose the signs again with `feedback_signs` and refit."""
    t64, h64 = t.double(), h.double()
    out, k = t.shape
    blk = torch.arange(k) // block_size
    n_blocks = -(-k // block_size)
    sign = torch.where(t64 >= 0, 1.0, -1.0).double()
    counts = torch.bincount(blk, minlength=n_blocks).double()
    alpha = torch.zeros(out, n_blocks, dtype=torch.float64).index_add_(1, blk, t64.abs()) / counts  # mean|t|
    beta = torch.ones(k, dtype=torch.float64)
    for rnd in range(2 if feedback else 1):
        if rnd:
            sign = feedback_signs(t64, (alpha[:, blk] * beta).abs(), h64, damp) * torch.sign(beta)
        for _ in range(iters):
            alpha = _alpha_sweep(t64, sign * beta, alpha, h64, block_size)
            beta = _beta_solve(t64, sign * alpha[:, blk], h64)
    norm = beta.abs().mean().clamp_min(1e-30)  # balance the two scales before rounding to fp16
    beta = round_to_fp16((beta / norm).float()).double()
    alpha = _alpha_sweep(t64, sign * beta, alpha * norm, h64, block_size)  # refit alpha on the stored beta
    return (sign > 0).to(torch.uint8), round_to_fp16(alpha.float()), beta.float()


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    return h + torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.diagonal(h).mean()


def _correction(d: torch.Tensor, h_cross: torch.Tensor, h_own: torch.Tensor) -> torch.Tensor:
    """D H_cross H_own^-1: the error-optimal update of the other columns for an error D."""
    return torch.linalg.solve(h_own.double(), (d.double() @ h_cross.double()).T).T.float()


@torch.inference_mode()
def ptq161_quantize(
    w: torch.Tensor, hessian: torch.Tensor, salient_grid: Grid, group_size: int, config: PTQ161Config = PTQ161Config()
) -> PTQ161Weight:
    """`w: [out, in]`, `hessian: [in, in]` (2 X^T X / n) -> a PTQ161Weight. `group_size`: the
    salient grid's group size along the salient channels and the binary alpha block size
    (-1: one per row)."""
    out, n_in = w.shape
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight width {n_in}")
    if group_size == 0:
        raise ValueError("PTQ1.61 scales rows or blocks of a row: use group_size > 0 or -1, not 0 (per tensor)")
    if config.salient_method not in ("gptq", "rtn"):
        raise ValueError(f"salient_method is gptq or rtn, got {config.salient_method!r}")
    if n_in < 2:
        raise ValueError("PTQ1.61 needs at least 2 input channels")
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diagonal(H) == 0  # never active in calibration: weight irrelevant
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_salient = min(max(round(config.salient_fraction * n_in), 1), n_in - 1)
    mask = salient_mask(H, n_salient)
    s, b = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
    Hd = _damped(H, config.damp)
    h_ss, h_bb, h_sb = Hd[s][:, s], Hd[b][:, b], Hd[s][:, b]
    w_s, w_b = W[:, s], W[:, b]
    block = b.numel() if group_size < 0 else min(group_size, b.numel())

    def binarize(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with _one_thread():  # many small solves and sweeps: threads only add overhead (and stall under load)
            signs, alpha, beta = fit_binary(target, h_bb, block, config.iters, config.feedback, config.damp)
        blk = torch.arange(b.numel()) // block
        return signs, alpha, beta, (2 * signs.float() - 1) * alpha[:, blk] * beta

    _, _, _, w_b_hat = binarize(w_b)
    target_s = w_s + _correction(w_b - w_b_hat, h_sb.T, h_ss)  # move the binarization error onto the salient channels
    layout = GroupLayout(out, n_salient, group_size)
    if config.salient_method == "gptq":
        salient: QuantizedWeight = gptq_quantize(target_s, H[s][:, s], salient_grid, layout, config.gptq)
    else:
        salient = rtn_quantize(target_s, salient_grid, layout)
    target_b = w_b + _correction(w_s - salient.dequantize(), h_sb, h_bb)  # and the salient rounding error back
    signs, alpha, beta, _ = binarize(target_b)
    return PTQ161Weight(mask, salient, signs, alpha, beta, block)
