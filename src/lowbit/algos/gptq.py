"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize one column at a time and push the rounding error of each
column onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ||W X - Q X||^2, H = 2 X^T X / n.

As in the paper: the inverse Hessian comes from a Cholesky factorisation of the dampened H
(damp * mean(diag H) on the diagonal); updates are applied lazily, `block_size` columns at a
time; act-order (on by default) visits columns in decreasing diag(H). Group parameters are fitted when
the first column of a group is reached, on the current (already error-corrected) values of that
group's columns. Groups are always the contiguous column ranges of the layout, also under
act-order, so storage and the runtime need no group index.

Only the grid interface is used (fit / encode / decode), so any scalar grid works.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..formats import Grid, GroupLayout, Params
from ..qtensor import QuantizedWeight


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    # visit columns in order of decreasing diag(H); "auto": quantize both ways, keep the lower output error
    act_order: bool | Literal["auto"] = "auto"


class GPTQError(RuntimeError):
    pass


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, computed in float64.
    The damping is raised tenfold (up to 3 times) if H is not positive definite."""
    mean_diag = torch.diag(h).double().mean()
    for attempt in range(4):
        # at most two float64 [in, in] matrices alive at once (an 8960-wide layer's is 642 MB)
        damped = h.double()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0:
                return upper.float()
    raise GPTQError(
        f"the Hessian is not positive definite even with damping {damp * 1000:g}; "
        "use more calibration samples or a larger --damp"
    )


@contextmanager
def _one_thread():
    """The column loop is a long run of tiny ops, which intra-op threads only slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """The layer's reconstruction loss up to a constant: tr((W - Q) H (W - Q)^T). w, w_hat: [out, in].
    `dtype`: of the product; float64 by default, float32 where only candidates are ranked (AWQ)."""
    d = (w.float() - w_hat.float()).to(dtype)
    return float(((d @ hessian.to(dtype)) * d).sum(dtype=torch.float64))


@torch.inference_mode()
def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig = GPTQConfig()
) -> QuantizedWeight:
    """`w: [out, in]`, `hessian: [in, in]` (2 X^T X / n) -> codes and parameters.

    act_order "auto" runs GPTQ in both column orders and keeps the result with the lower output
    error: act-order lowers it for integer and most scalar grids (about 20% on the reference model's
    layers), but for grids whose scale is a statistic of the group (ternary, binary: absmean) fitting
    a group when its first high-energy column comes up, before the other columns' error feedback
    has arrived, can double it. Measuring both is format-agnostic and costs a second pass."""
    return _best_order(w, hessian, grid, layout, config, keep_rounded=False)[0]


def gptq_quantize_rounded(
    w: torch.Tensor, hessian: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig = GPTQConfig()
) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ, and the values it rounded: `[out, in]`, each column as the error feedback of the columns
    before it left it when its codes were chosen (the grid's `encode` of it gives the codes). Learned
    rounding starts from them: their distance to a rounding boundary says how close a code was."""
    qw, rounded = _best_order(w, hessian, grid, layout, config, keep_rounded=True)
    assert rounded is not None
    return qw, rounded


def _best_order(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig,
                keep_rounded: bool) -> tuple[QuantizedWeight, torch.Tensor | None]:
    if config.act_order == "auto":
        tries = [_gptq(w, hessian, grid, layout, replace(config, act_order=ao), keep_rounded) for ao in (True, False)]
        return min(tries, key=lambda t: output_error(w, t[0].dequantize(), hessian))
    return _gptq(w, hessian, grid, layout, config, keep_rounded)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig,
          keep_rounded: bool = False) -> tuple[QuantizedWeight, torch.Tensor | None]:
    n_cols = w.shape[1]
    layout.check_span(grid)
    if hessian.shape != (n_cols, n_cols):
        raise GPTQError(f"Hessian shape {tuple(hessian.shape)} does not match weight width {n_cols}")
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs never active in calibration: no information, weight irrelevant
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if config.act_order else torch.arange(n_cols)
    inv_perm = torch.argsort(perm)
    # Work on the transpose, Wt: [in (visit order), out], so that one column of W is one contiguous row.
    Wt = W.T[perm].contiguous()
    hinv = inverse_hessian_cholesky(H[perm][:, perm], config.damp)
    del H, W

    group_at = layout.group_of_column()[perm]  # [in] group of each visited position
    n_groups = layout.n_groups
    params: Params = {}
    fitted = [False] * n_groups
    codes_t = torch.zeros(Wt.shape, dtype=torch.uint8)  # [in (visit order), out]
    # [in (visit order), out]: each column as it was when encoded (only if asked: a layer's size more)
    rounded_t = torch.empty(Wt.shape) if keep_rounded else None

    def fit_group(g: int, i1: int, i2: int, W1: torch.Tensor) -> None:
        # the group, or the span of groups the grid fits together (K-quant super-blocks)
        groups = layout.span_groups(grid, g)
        cols = torch.cat([torch.arange(layout.in_features)[layout.group_columns(j)] for j in groups])
        pos = inv_perm[cols]  # visit positions of the groups' columns, all >= now
        cur = Wt[pos].clone()
        inside = (pos >= i1) & (pos < i2)
        cur[inside] = W1[pos[inside] - i1]
        for name, value in layout.fit_block(grid, cur.T).items():
            if name not in params:
                params[name] = torch.zeros(layout.param_rows, n_groups)
            params[name][:, groups.start : groups.stop] = value
        for j in groups:
            fitted[j] = True

    for i1 in range(0, n_cols, config.block_size):
        i2 = min(i1 + config.block_size, n_cols)
        W1 = Wt[i1:i2].clone()  # [B, out]: this block's columns, updated as the loop goes
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread():
            for i in range(i2 - i1):
                g = int(group_at[i1 + i])
                if not fitted[g]:
                    fit_group(g, i1, i2, W1)
                col_params = {k: v[:, g : g + 1] for k, v in params.items()}
                col = W1[i].unsqueeze(1)  # [out, 1]
                if rounded_t is not None:
                    rounded_t[i1 + i] = col[:, 0]
                c = grid.encode(col, col_params)
                codes_t[i1 + i] = c[:, 0]
                err = (col - grid.decode(c, col_params))[:, 0] / hinv1[i, i]
                W1[i:].addr_(hinv1[i, i:], err, alpha=-1.0)  # push the error onto the later columns
                err1[i] = err
        Wt[i2:] -= hinv[i1:i2, i2:].T @ err1

    qw = QuantizedWeight(codes_t[inv_perm].T.contiguous(), params, grid, layout)
    return qw, None if rounded_t is None else rounded_t[inv_perm].T.contiguous()
