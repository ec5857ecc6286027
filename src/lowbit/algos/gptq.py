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

from ..calib.hessian import row_groups
from ..formats import Grid, GroupLayout, Params
from ..qtensor import QuantizedWeight


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    # visit columns in order of decreasing diag(H); "auto": quantize both ways, keep the lower output error
    act_order: bool | Literal["auto"] = "auto"
    sweeps: int = 0  # vector formats: coordinate-descent sweeps on the codes after the pass (`algos.vq.refine_codes`)


class GPTQError(RuntimeError):
    pass


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                              dead: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H' + damp * mean(diag H') * I)^-1, computed in float64, where H' is
    `h` with rows and columns in the order `perm` (None: as is) and the diagonal of the `dead`
    inputs (bool, in h's order) set to 1. The damping is raised tenfold (up to 3 times) if H' is not
    positive definite.

    Memory (an 8960-wide layer's float32 H is 321 MB): H' is built in float64 a row chunk at a
    time, with no float32 copy of H, and LAPACK factorises, inverts and factorises again in that one
    float64 matrix (potrf, potri, potrf), so the solve needs one float64 H and the float32 result."""
    from scipy.linalg import lapack

    for attempt in range(4):
        damped = _permuted_float64(h, perm, dead)
        damped.diagonal().add_(damp * 10**attempt * damped.diagonal().contiguous().mean())
        # H' is symmetric, so its column-major view is H' too; LAPACK works on it in place.
        a = damped.numpy().T
        a, info = lapack.dpotrf(a, lower=0, clean=0, overwrite_a=1)  # upper U, H' = U^T U
        if info == 0:
            a, info = lapack.dpotri(a, lower=0, overwrite_c=1)  # upper triangle of H'^-1
        if info == 0:
            a, info = lapack.dpotrf(a, lower=0, clean=1, overwrite_a=1)  # upper factor of H'^-1
        if info == 0:
            return torch.from_numpy(a).to(torch.float32, memory_format=torch.contiguous_format)
        del a, damped
    raise GPTQError(
        f"the Hessian is not positive definite even with damping {damp * 1000:g}; "
        "use more calibration samples or a larger --damp"
    )


_ROW_CHUNK = 512  # rows of H converted at a time: a small float32 transient however wide the layer


def _permuted_float64(h: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor | None) -> torch.Tensor:
    """`h[perm][:, perm]` as a new float64 matrix, filled a row chunk at a time; dead inputs' diagonal = 1."""
    n = h.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, _ROW_CHUNK):
        rows = h[i : i + _ROW_CHUNK] if perm is None else h.index_select(0, perm[i : i + _ROW_CHUNK])
        out[i : i + _ROW_CHUNK] = rows if perm is None else rows.index_select(1, perm)
    if dead is not None and bool(dead.any()):
        out.diagonal()[dead if perm is None else dead[perm]] = 1.0
    return out


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
    """The layer's reconstruction loss up to a constant: tr((W - Q) H (W - Q)^T). w, w_hat: [out, in];
    hessian [in, in], or [groups, in, in] for groups of rows (`calib.hessian.row_groups`), each
    group's rows then weighed by its own. `dtype`: of the product; float64 by default, float32 where
    only candidates are ranked (AWQ). H is converted a column chunk at a time, so no full float64
    copy of a wide layer's H is made."""
    if hessian.dim() == 3:
        return sum(output_error(w[rows], w_hat[rows], h, dtype)
                   for rows, h in zip(row_groups(w.shape[0], hessian.shape[0]), hessian, strict=True))
    d = (w.float() - w_hat.float()).to(dtype)  # [out, in]
    total = torch.zeros((), dtype=torch.float64)
    for j in range(0, hessian.shape[1], _ROW_CHUNK):
        cols = slice(j, j + _ROW_CHUNK)
        total += ((d @ hessian[:, cols].to(dtype)) * d[:, cols]).sum(dtype=torch.float64)
    return float(total)


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
    if hessian.dim() == 3:
        return _by_row_groups(w, hessian, grid, layout, config, keep_rounded)
    if config.act_order == "auto":
        tries = [_gptq(w, hessian, grid, layout, replace(config, act_order=ao), keep_rounded) for ao in (True, False)]
        return min(tries, key=lambda t: output_error(w, t[0].dequantize(), hessian))
    return _gptq(w, hessian, grid, layout, config, keep_rounded)


def _by_row_groups(w: torch.Tensor, hessians: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig,
                   keep_rounded: bool) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """GPTQ with one Hessian per group of output rows (`hessians: [groups, in, in]`, GuidedQuant's
    grouped Fisher, rows split by `calib.hessian.row_groups`): GPTQ's solve is separable over rows,
    so each group is solved on its own Hessian and the codes and per-row parameters are stacked.
    A per-tensor layout shares one parameter set across rows and takes the groups' mean Hessian."""
    if layout.per_tensor:
        return _best_order(w, hessians.mean(0), grid, layout, config, keep_rounded)
    parts = [_best_order(w[rows], h, grid, replace(layout, out_features=rows.stop - rows.start), config, keep_rounded)
             for rows, h in zip(row_groups(w.shape[0], hessians.shape[0]), hessians, strict=True)]
    params = {k: torch.cat([qw.params[k] for qw, _ in parts]) for k in parts[0][0].params}
    qw = QuantizedWeight(torch.cat([qw.codes for qw, _ in parts]), params, grid, layout)
    return qw, torch.cat([r for _, r in parts]) if keep_rounded else None


def _gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, layout: GroupLayout, config: GPTQConfig,
          keep_rounded: bool = False) -> tuple[QuantizedWeight, torch.Tensor | None]:
    n_cols = w.shape[1]
    layout.check_span(grid)
    if hessian.shape != (n_cols, n_cols):
        raise GPTQError(f"Hessian shape {tuple(hessian.shape)} does not match weight width {n_cols}")
    W = w.float().clone()
    diag = torch.diag(hessian).float()
    dead = diag == 0  # inputs never active in calibration: no information, weight irrelevant
    diag[dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(diag, descending=True, stable=True) if config.act_order else torch.arange(n_cols)
    inv_perm = torch.argsort(perm)
    # Work on the transpose, Wt: [in (visit order), out], so that one column of W is one contiguous row.
    Wt = W.T[perm].contiguous()
    del W
    hinv = inverse_hessian_cholesky(hessian, config.damp, perm, dead)

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
