"""lowbit codes and scales -> GGUF blocks, byte for byte (layouts from ggml-common.h; decoders in
gguf-py's `gguf.quants`). Per block, in field order ("half": fp16 little-endian; u: unsigned
code, v: signed integer, t: trit in {-1, 0, 1}):

    Q4_0   32 / 18   [d: half][qs: 16]               d * (u - 8);  byte j = u[j] | u[j+16] << 4
    Q4_1   32 / 20   [d: half][m: half][qs: 16]      d * u + m;    qs as Q4_0
    Q5_0   32 / 22   [d: half][qh: u32 LE][qs: 16]   d * (u - 16); qs: low 4 bits as Q4_0, bit j of qh = bit 4 of u[j]
    Q5_1   32 / 24   [d][m][qh][qs]                  d * u + m;    qh, qs as Q5_0
    Q8_0   32 / 34   [d: half][qs: 32 x int8]        d * v;        element order
    MXFP4  32 / 17   [e: E8M0][qs: 16]               2^(e-127) * E2M1[u], u the OCP E2M1 nibble; qs as Q4_0
    TQ2_0  256 / 66  [qs: 64][d: half]               d * (u - 1);  byte 32h + m, bits 2l = u[128h + 32l + m]
    TQ1_0  256 / 54  [qs: 48][qh: 4][d: half]        d * t;        base-3 digits (below)

K-quants (super-blocks of 256; sc, m: the blocks' 6-bit scale and min codes, 8 per super-block):

    Q4_K   256 / 144 [d][dmin][scales: 12][qs: 128]  (d*sc_j)*u - dmin*m_j, u in 0..15, block j = 32
    Q5_K   256 / 176 [d][dmin][scales: 12][qh: 32][qs: 128]  as Q4_K, u in 0..31
    Q6_K   256 / 210 [ql: 128][qh: 64][scales: 16 x int8][d]  (d*s_j)*(u - 32), u in 0..63, block j = 16

Q4_K/Q5_K scales: byte j < 4 = sc[j] | (sc[j+4] >> 4) << 6, byte 4 + j = m[j] | (m[j+4] >> 4) << 6,
byte 8 + j = (sc[j+4] & 15) | (m[j+4] & 15) << 4. qs: 4 chunks of 32 bytes, byte l of chunk c =
u[64c + l] | u[64c + 32 + l] << 4 (low nibbles for Q5_K); Q5_K qh: bit k of byte l = bit 4 of
u[32k + l]. Q6_K: ql byte 64h + b = low4(u[128h + b]) | low4(u[128h + 64 + b]) << 4; qh byte
32h + b, bits 2k..2k+1 = high2(u[128h + 32k + b]).

TQ1_0 holds 5 trits (t + 1) a byte, most significant first: byte j < 32 of qs holds elements
32k + j, byte 32 + j (j < 16) elements 160 + 16k + j (k = 0..4), qh byte j elements 240 + 4k + j
(k = 0..3, with a zero fifth digit); each base-3 number b is stored as ceil(b * 256 / 243), so
that ggml reads digit k back as the top bits of (byte * 3^k mod 256) * 3.

Rows stay rows: a weight [out, in] becomes a uint8 matrix [out, in / block * block_bytes], which
gguf-py writes as a tensor of logical shape [out, in]. Rows can therefore be permuted (llama's
Q/K order) without touching any block.
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats import IntMinGrid, KQuantGrid, MXFP4Grid
from ..qtensor import QuantizedWeight
from ._common import integer_view, unwrap
from .targets import GGML_TYPES


def _half(x: np.ndarray) -> np.ndarray:
    """[..., 1] fp16-exact float32 -> [..., 2] little-endian fp16 bytes."""
    h = x.astype("<f2")
    if not np.array_equal(h.astype(np.float32), x):
        raise ValueError("a block parameter is not an fp16 number")
    return h.view(np.uint8)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[..., 32] values in 0..15 -> [..., 16] bytes: byte j = u[j] | u[j + 16] << 4."""
    return u[..., :16] | (u[..., 16:] << 4)


def _high_bits(u: np.ndarray) -> np.ndarray:
    """[..., 32] values in 0..31 -> [..., 4] bytes: a little-endian uint32 whose bit j is bit 4 of u[j]."""
    bits = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32, keepdims=True).astype("<u4").view(np.uint8)


def _base3(t: np.ndarray, digits: int) -> np.ndarray:
    """[..., digits, n] values in 0..2 -> [..., n] bytes: the digits as one base-3 number, first
    digit most significant, padded to 5 digits, stored as ceil(b * 256 / 243)."""
    weights = (3 ** np.arange(4, 4 - digits, -1)).reshape(digits, 1).astype(np.uint16)
    b = (t.astype(np.uint16) * weights).sum(axis=-2, dtype=np.uint16)
    return ((b * 256 + 242) // 243).astype(np.uint8)


def pack_q4_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """v: [..., 32] in -8..7, d: [..., 1] -> [..., 18]."""
    return np.concatenate([_half(d), _nibbles((v + 8).astype(np.uint8))], axis=-1)


def pack_q4_1(u: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """u: [..., 32] in 0..15, d and m: [..., 1] -> [..., 20]."""
    return np.concatenate([_half(d), _half(m), _nibbles(u.astype(np.uint8))], axis=-1)


def pack_q5_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """v: [..., 32] in -16..15, d: [..., 1] -> [..., 22]."""
    u = (v + 16).astype(np.uint8)
    return np.concatenate([_half(d), _high_bits(u), _nibbles(u & 0x0F)], axis=-1)


def pack_q5_1(u: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """u: [..., 32] in 0..31, d and m: [..., 1] -> [..., 24]."""
    u = u.astype(np.uint8)
    return np.concatenate([_half(d), _half(m), _high_bits(u), _nibbles(u & 0x0F)], axis=-1)


def pack_q8_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """v: [..., 32] in -128..127, d: [..., 1] -> [..., 34]."""
    return np.concatenate([_half(d), v.astype(np.int8).view(np.uint8)], axis=-1)


def pack_mxfp4(u: np.ndarray, e: np.ndarray) -> np.ndarray:
    """u: [..., 32] E2M1 nibbles (bit 3 the sign), e: [..., 1] E8M0 codes -> [..., 17]."""
    return np.concatenate([e.astype(np.uint8), _nibbles(u.astype(np.uint8))], axis=-1)


def pack_tq2_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """v: [..., 256] in -1..1, d: [..., 1] -> [..., 66]."""
    u = (v + 1).astype(np.uint8).reshape(*v.shape[:-1], 2, 4, 32)  # [h, l, m] = element 128h + 32l + m
    qs = (u << (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)).sum(axis=-2, dtype=np.uint8)
    return np.concatenate([qs.reshape(*v.shape[:-1], 64), _half(d)], axis=-1)


def pack_tq1_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """v: [..., 256] in -1..1, d: [..., 1] -> [..., 54]."""
    t, lead = (v + 1).astype(np.uint8), v.shape[:-1]
    qs0 = _base3(t[..., :160].reshape(*lead, 5, 32), 5)  # [..., 32]
    qs1 = _base3(t[..., 160:240].reshape(*lead, 5, 16), 5)  # [..., 16]
    qh = _base3(t[..., 240:].reshape(*lead, 4, 4), 4)  # [..., 4]
    return np.concatenate([qs0, qs1, qh, _half(d)], axis=-1)


def _kquant_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sc, m: [..., 8] 6-bit codes -> [..., 12] bytes (Q4_K / Q5_K `scales`)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return np.concatenate([lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 15) | ((hi_m & 15) << 4)],
                          axis=-1).astype(np.uint8)


def _kquant_nibbles(u: np.ndarray) -> np.ndarray:
    """[..., 256] values (low 4 bits used) -> [..., 128] bytes: chunk c, byte l = u[64c + l] | u[64c + 32 + l] << 4."""
    c = (u & 15).reshape(*u.shape[:-1], 4, 2, 32)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*u.shape[:-1], 128)


def pack_q4_k(u: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """u: [..., 256] in 0..15, d and dmin: [..., 1], sc and m: [..., 8] in 0..63 -> [..., 144]."""
    u, sc, m = u.astype(np.uint8), sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([_half(d), _half(dmin), _kquant_scales(sc, m), _kquant_nibbles(u)], axis=-1)


def pack_q5_k(u: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """u: [..., 256] in 0..31, d and dmin: [..., 1], sc and m: [..., 8] in 0..63 -> [..., 176]."""
    u, sc, m = u.astype(np.uint8), sc.astype(np.uint8), m.astype(np.uint8)
    high = ((u >> 4) & 1).reshape(*u.shape[:-1], 8, 32)  # [k, l] = bit 4 of u[32k + l]
    qh = (high << np.arange(8, dtype=np.uint8).reshape(8, 1)).sum(axis=-2, dtype=np.uint8)
    return np.concatenate([_half(d), _half(dmin), _kquant_scales(sc, m), qh, _kquant_nibbles(u)], axis=-1)


def pack_q6_k(u: np.ndarray, d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """u: [..., 256] in 0..63, d: [..., 1], s: [..., 16] signed block scales in -128..127 -> [..., 210]."""
    u, lead = u.astype(np.uint8), u.shape[:-1]
    halves = u.reshape(*lead, 2, 2, 64)  # [h, j, b] = u[128h + 64j + b]
    ql = ((halves[..., 0, :] & 15) | ((halves[..., 1, :] & 15) << 4)).reshape(*lead, 128)
    high = (u >> 4).reshape(*lead, 2, 4, 32)  # [h, k, b] = high2(u[128h + 32k + b])
    qh = (high << (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)).sum(axis=-2, dtype=np.uint8).reshape(*lead, 64)
    return np.concatenate([ql, qh, s.astype(np.int8).view(np.uint8), _half(d)], axis=-1)


_SIGNED = {"Q4_0": pack_q4_0, "Q5_0": pack_q5_0, "Q8_0": pack_q8_0, "TQ2_0": pack_tq2_0, "TQ1_0": pack_tq1_0}
_AFFINE = {"Q4_1": pack_q4_1, "Q5_1": pack_q5_1}


def _per_block(per_column: torch.Tensor, block: int) -> np.ndarray:
    """[out, in] a parameter of every column -> [out, in / block, 1], one value per block (groups
    must be whole blocks)."""
    first = per_column[:, ::block]
    if not torch.equal(first.repeat_interleave(block, dim=1), per_column):
        raise ValueError(f"a {block}-weight block spans two groups; groups must be whole blocks")
    return first.numpy().astype(np.float32)[..., None]


def pack_blocks(qw: QuantizedWeight, ggml_type: str, name: str = "weight") -> np.ndarray:
    """[out, n_blocks * block_bytes] uint8: the weight as GGUF `ggml_type` blocks (`targets.misfit`
    says which weights fit which type; one that does not raises ValueError, or ExportError naming
    `name` for a grid with no integer form)."""
    t = GGML_TYPES[ggml_type]
    out_f, in_f = qw.shape
    if in_f % t.block:
        raise ValueError(f"input width {in_f} is not a multiple of {t.name}'s {t.block}-weight block")
    nb = in_f // t.block
    grid = unwrap(qw.grid)

    def cols(x: torch.Tensor) -> torch.Tensor:  # [param_rows | out, in or 1] -> [out, in]
        return x.expand(out_f, in_f) if x.shape != (out_f, in_f) else x

    def blocks(x: torch.Tensor) -> np.ndarray:  # [out, in] -> [out, nb, block]
        return x.numpy().reshape(out_f, nb, t.block)

    if ggml_type in _SIGNED:
        view = integer_view(name, qw)  # w = scale * (u - zero) per group
        idx = torch.arange(in_f) // view.group_size
        v = view.u - view.zero[:, idx]
        if int(v.min()) < t.lo or int(v.max()) > t.hi:
            raise ValueError(f"{t.name} holds integers in [{t.lo}, {t.hi}]; this weight's are in [{int(v.min())}, {int(v.max())}]")
        packed = _SIGNED[ggml_type](blocks(v.to(torch.int16)), _per_block(view.scale[:, idx], t.block))
    elif ggml_type in _AFFINE:
        if not isinstance(grid, IntMinGrid) or grid.maxq > t.hi:
            raise ValueError(f"{t.name} stores codes 0..{t.hi} with an fp16 scale and min; {qw.grid.name} is not that")
        p = qw.layout.expand(qw.params)
        packed = _AFFINE[ggml_type](blocks(qw.codes), _per_block(cols(p["scale"]), t.block), _per_block(cols(p["min"]), t.block))
    elif ggml_type == "MXFP4":
        if not isinstance(grid, MXFP4Grid):
            raise ValueError(f"MXFP4 stores E2M1 codes with E8M0 scales; {qw.grid.name} is not that")
        e = _per_block(cols(qw.layout.expand(qw.params)["scale_exp"]), t.block)
        packed = pack_mxfp4(blocks(qw.codes), e)
    elif ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
        if not isinstance(grid, KQuantGrid) or grid.ggml_type != ggml_type:
            raise ValueError(f"{ggml_type} stores {ggml_type[1]}-bit codes under 6/8-bit block scales with an fp16 scale "
                             f"per 256 (format int{ggml_type[1]}_k); {qw.grid.name} is not that")
        span, n_sb = grid.fit_span, in_f // t.block
        p = {k: v.expand(out_f, -1).numpy() for k, v in qw.params.items()}  # [out, n_groups] each
        d = p["d"][:, ::span].reshape(out_f, n_sb, 1).astype(np.float32)
        sc = p["sc"].reshape(out_f, n_sb, span).astype(np.int16)
        u = blocks(qw.codes)
        if grid.affine:
            dmin = p["dmin"][:, ::span].reshape(out_f, n_sb, 1).astype(np.float32)
            m = p["m"].reshape(out_f, n_sb, span).astype(np.int16)
            packed = (pack_q4_k if ggml_type == "Q4_K" else pack_q5_k)(u, d, dmin, sc, m)
        else:
            packed = pack_q6_k(u, d, sc - 128)
    else:
        raise ValueError(f"no packer for GGUF type {ggml_type}")
    return np.ascontiguousarray(packed.reshape(out_f, nb * t.block_bytes))
