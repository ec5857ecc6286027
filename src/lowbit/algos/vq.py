"""Vector quantization of a layer onto a codebook format (`formats.vq`).

1. Scales: each group of `group_size` input columns of a row (or the whole row) divided by its
   RMS (fp16), so one codebook serves groups of any size.
2. Codebook: weighted k-means (`algos.kmeans`) of the scaled d-vectors, each entry weighted by
   the Hessian diagonal of its input channel times its group's squared scale (the vector's weight
   in the layer's output error; VPTQ, Liu et al., 2024, "VPTQ: Extreme Low-bit Vector
   Post-Training Quantization for Large Language Models", weighs by the Hessian diagonal),
   k-means++ seeded; fp16. Residual stages (RVQ) fit each next codebook to what the stages
   before it left; row groups (GRVQ) fit their own stages on their own rows.
3. Assignment (stage by stage, greedy: each stage takes the codeword nearest the residual):
   - `rtn`: every vector to its nearest codeword (plain weighted distance);
   - `gptq`: GPTQ's error feedback with d columns at a time (`algos.vector_gptq`: GPTVQ, VPTQ):
     a vector goes to the codeword nearest under the inverse-Hessian metric, then its columns'
     errors are pushed onto the columns not yet quantized.
4. Optionally (`GPTQConfig.sweeps`), sweeps of exact coordinate descent on the codes
   (`refine_codes`; the code step of JLCM / PV-Tuning's light path, on the layer objective): GPTQ
   decides each vector once, knowing only the columns before it; a sweep revisits every vector
   with all others fixed and takes the codeword that lowers tr((W-Q) H (W-Q)^T) the most. On four
   SmolLM2 layers at vq4x8 g128, three sweeps lowered that error to 0.76-0.90x, seconds a layer.

The codes GPTQ chose are kept as they are. Re-fitting the codebook to the error-corrected vectors
and re-assigning them afterwards (tried: it lowers the k-means objective on those vectors) undoes
the error feedback, whose corrections were made for the codewords first chosen: on SmolLM2's
layers it raised the output error tr((W-Q) H (W-Q)^T) by 40-70%. Codebooks and scales are
instead trained against the model's own output by `tune` (PV-Tuning's continuous step).
"""

from __future__ import annotations

import torch

from ..formats import round_to_fp16
from ..formats.vq import VQFormat, stored_order
from ..pack import code_dtype
from ..qtensor import VQWeight
from .gptq import GPTQConfig
from .kmeans import assign, kmeans
from .vector_gptq import vector_gptq


def group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w: [out, in]` -> [out, n_groups] fp16-exact RMS of every group of `group_size` columns
    (-1: of every row; the last group may be shorter); an all-zero group gets 1."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    sq = w.pow(2)
    n_full = in_f // g
    parts = [sq[:, : n_full * g].reshape(out_f, n_full, g).mean(-1)] if n_full else []
    if n_full * g < in_f:
        parts.append(sq[:, n_full * g :].mean(-1, keepdim=True))
    rms = torch.cat(parts, dim=1).sqrt()
    return round_to_fp16(torch.where(rms > 0, rms, torch.ones_like(rms)))


def vq_quantize(w: torch.Tensor, fmt: VQFormat, hessian: torch.Tensor | None = None, method: str = "gptq",
                config: GPTQConfig = GPTQConfig(), seed: int = 0, group_size: int = -1) -> VQWeight:
    """`w: [out, in]`, `hessian: [in, in]` (2 X^T X / n; None: plain distances, method rtn only);
    one scale per `group_size` columns (-1: per row)."""
    out_f, in_f = w.shape
    fmt.check_width(in_f)
    fmt.check_group_size(group_size)
    d = fmt.dim
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method {method!r} does not quantize onto a vector codebook (rtn or gptq)")
    if method == "gptq" and hessian is None:
        raise ValueError("gptq onto a vector codebook needs the layer's Hessian")
    w = w.float()
    scales = group_scales(w, group_size)  # [out, n_groups]
    col_s = fmt.column_scales(scales, in_f, group_size)  # [out, in]
    columns = outlier_columns(w, hessian, fmt)
    if columns is not None:  # the outlier columns first: they are coded (and fed back) first
        order = stored_order(columns, in_f)
        w, col_s = w[:, order], col_s[:, order]
        hessian = None if hessian is None else hessian[order][:, order]
    n_out = 0 if columns is None else columns.numel() // d  # outlier vectors per row
    wn = w / col_s
    diag = torch.ones(in_f) if hessian is None else torch.diag(hessian).float().clamp(min=0)
    diag = diag / diag.mean().clamp(min=1e-30) + 1e-6  # only the relative weights matter
    importance = diag * col_s.pow(2)  # [out, in]: each entry's weight in the output error
    vec_w = (importance / importance.mean()).reshape(out_f, in_f // d, d)  # [out, in/d, d]
    rows = row_slices(fmt, out_f)
    vecs = wn.reshape(out_f, in_f // d, d)
    main = slice(n_out, None)
    books = [_fit_stages(vecs[r, main].reshape(-1, d), vec_w[r, main].reshape(-1, d), fmt, seed + g * fmt.stages)
             for g, r in enumerate(rows)]
    if n_out:
        books.append(_fit_stages(vecs[:, :n_out].reshape(-1, d), vec_w[:, :n_out].reshape(-1, d), fmt,
                                 seed + fmt.groups * fmt.stages))
    codebook = torch.cat(books)  # [n_codebooks * K, d]
    if method == "rtn":
        codes = torch.empty(out_f, in_f // d, fmt.stages, dtype=torch.int64)
        for g, r in enumerate(rows):
            codes[r, main] = encode(vecs[r, main].reshape(-1, d), vec_w[r, main].reshape(-1, d),
                                    _books(codebook, fmt, g))[0].reshape(r.stop - r.start, -1, fmt.stages)
        if n_out:
            codes[:, :n_out] = encode(vecs[:, :n_out].reshape(-1, d), vec_w[:, :n_out].reshape(-1, d),
                                      _books(codebook, fmt, fmt.groups))[0].reshape(out_f, n_out, fmt.stages)
        codes = codes.reshape(out_f, -1)
    else:
        codes = _vq_gptq(w, col_s, hessian, codebook, fmt, n_out, config)
        if config.sweeps:
            codes = refine_codes(w, hessian, col_s, codes, codebook, fmt, n_out, config.sweeps)
    return VQWeight(codes.to(code_dtype(fmt.bits)), codebook, scales, fmt, group_size, columns)


def outlier_columns(w: torch.Tensor, hessian: torch.Tensor | None, fmt: VQFormat) -> torch.Tensor | None:
    """The input columns the outlier codebook takes (`fmt.outlier_columns` of them, ascending): the
    largest Hessian diagonal times mean squared weight, each column's share of the output error
    (VPTQ's outlier elimination ranks by the Hessian). None without outliers."""
    n = fmt.outlier_columns(w.shape[1])
    if not n:
        return None
    share = w.pow(2).mean(0) * (1.0 if hessian is None else torch.diag(hessian).float().clamp(min=0))
    return torch.sort(torch.topk(share, n, sorted=False).indices).values


def row_slices(fmt: VQFormat, out_features: int) -> list[slice]:
    """The rows of each codebook group (`fmt.row_groups`), as slices."""
    counts = torch.bincount(fmt.row_groups(out_features), minlength=fmt.groups).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [slice(e - c, e) for c, e in zip(counts, ends)]


def _books(codebook: torch.Tensor, fmt: VQFormat, group: int) -> torch.Tensor:
    """The stages' codebooks of one row group: [stages, K, d]."""
    per = fmt.stages * fmt.codebook_size
    return codebook[group * per : (group + 1) * per].reshape(fmt.stages, fmt.codebook_size, fmt.dim)


def _fit_stages(x: torch.Tensor, weights: torch.Tensor, fmt: VQFormat, seed: int) -> torch.Tensor:
    """Greedy residual k-means of `x, weights: [n, d]`: each stage's fp16 codebook fitted to what
    the stages before left. Returns [stages * K, d]."""
    books = []
    residual = x
    for s in range(fmt.stages):
        book = round_to_fp16(kmeans(residual, fmt.codebook_size, weights, seed=seed + s))
        if s + 1 < fmt.stages:
            residual = residual - book[assign(residual, weights, book)]
        books.append(book)
    return torch.cat(books)


def encode(x: torch.Tensor, weights: torch.Tensor, books: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual coding of `x, weights: [n, d]` on `books: [stages, K, d]`: codes [n, stages]
    int64 and the coded vectors [n, d] (the codewords' sum)."""
    codes = torch.empty(x.shape[0], books.shape[0], dtype=torch.int64)
    coded = torch.zeros_like(x)
    for s, book in enumerate(books):
        codes[:, s] = assign(x - coded, weights, book)
        coded = coded + book[codes[:, s]]
    return codes, coded


def _vq_gptq(w: torch.Tensor, col_s: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, fmt: VQFormat,
             n_out: int, config: GPTQConfig) -> torch.Tensor:
    """`vector_gptq` onto `codebook` times the columns' scales `col_s: [out, in]`, the first `n_out`
    vectors of every row on the outlier codebooks. Returns the codes [out, in/d * stages] int64."""
    out_f, in_f = w.shape
    d, stages = fmt.dim, fmt.stages
    codes = torch.empty(out_f, in_f // d * stages, dtype=torch.int64)
    rows = row_slices(fmt, out_f)
    books = [_books(codebook, fmt, g) for g in range(fmt.groups + (1 if n_out else 0))]

    def nearest_codewords(j: int, sub: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        s = col_s[:, j * d : (j + 1) * d]  # [out, d]; equal along d except in outlier vectors
        at = slice(j * stages, (j + 1) * stages)
        if j < n_out:  # outlier columns may straddle scale groups: distances in the weights' own units
            codes[:, at], coded = encode(sub / s, weights * s.pow(2), books[-1])
            return coded * s
        q = torch.empty_like(sub)
        for r, book in zip(rows, books):  # a vector inside one scale group: its scale does not change the nearest
            codes[r, at], coded = encode(sub[r] / s[r], weights[r], book)
            q[r] = coded * s[r]
        return q

    vector_gptq(w, hessian, d, nearest_codewords, config)
    return codes


ROWS_PER_CHUNK_ELEMS = 1 << 22  # candidate values [rows, K, d] formed at a time in a sweep


def refine_codes(w: torch.Tensor, hessian: torch.Tensor, col_s: torch.Tensor, codes: torch.Tensor,
                 codebook: torch.Tensor, fmt: VQFormat, n_out: int, sweeps: int) -> torch.Tensor:
    """Exact block coordinate descent on the codes: `sweeps` passes over every vector (and stage),
    each taking, with all other codes fixed, the codeword of least output error
    tr((W-Q) H (W-Q)^T). The current codeword is a candidate, so the error never rises.
    `w, col_s: [out, in]`, `hessian: [in, in]` and `codes: [out, in/d * stages]` in stored order
    (outlier vectors first); returns the new codes, same shape."""
    out_f, in_f = w.shape
    d, stages = fmt.dim, fmt.stages
    codes = codes.reshape(out_f, in_f // d, stages).clone()
    rows = row_slices(fmt, out_f)
    books = [_books(codebook, fmt, g) for g in range(fmt.groups + (1 if n_out else 0))]
    h = hessian.float()
    vec = torch.empty(out_f, in_f // d, d)  # every vector's codeword sum, before its scale
    for r, book in zip(rows, books):
        vec[r, n_out:] = book[torch.arange(stages), codes[r, n_out:]].sum(-2)
    if n_out:
        vec[:, :n_out] = books[-1][torch.arange(stages), codes[:, :n_out]].sum(-2)
    q = vec.reshape(out_f, in_f) * col_s
    resid = (q - w) @ h  # [out, in]: half the objective's gradient in Q
    step = max(1, ROWS_PER_CHUNK_ELEMS // (fmt.codebook_size * d))
    for _ in range(sweeps):
        for j in range(in_f // d):
            cols = slice(j * d, (j + 1) * d)
            h_jj, h_j = h[cols, cols], h[cols]
            pairs = [(slice(0, out_f), books[-1])] if j < n_out else list(zip(rows, books))
            for r, book in pairs:
                for start in range(r.start, r.stop, step):
                    c = slice(start, min(start + step, r.stop))
                    for st in range(stages):
                        other = vec[c, j] - book[st][codes[c, j, st]]  # [n, d]
                        cand = (other.unsqueeze(1) + book[st]) * col_s[c, cols].unsqueeze(1)  # [n, K, d]
                        delta = cand - q[c, cols].unsqueeze(1)
                        gain = torch.einsum("nkd,de,nke->nk", delta, h_jj, delta) + 2 * (delta * resid[c, cols].unsqueeze(1)).sum(-1)
                        best = gain.argmin(1)
                        new = cand[torch.arange(best.numel()), best]  # [n, d]
                        resid[c] += (new - q[c, cols]) @ h_j
                        q[c, cols] = new
                        codes[c, j, st] = best
                        vec[c, j] = other + book[st][best]
    return codes.reshape(out_f, -1)
