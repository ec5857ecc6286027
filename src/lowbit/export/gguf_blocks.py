"""lowbit codes and scales -> GGUF legacy blocks, byte for byte (layouts from ggml-common.h):

    Q4_0  [d: fp16][qs: 16 bytes]             byte j = u[j] | u[j+16] << 4
    Q5_0  [d: fp16][qh: uint32 LE][qs: 16]    qs as Q4_0 (low 4 bits); bit j of qh = bit 4 of u[j]
    Q8_0  [d: fp16][qs: 32 x int8]            element order

Rows stay rows: a weight [out, in] becomes a uint8 matrix [out, in / 32 * block_bytes], which
gguf-py writes as a tensor of logical shape [out, in]. Rows can therefore be permuted (llama's
Q/K order) without touching any block.
"""

from __future__ import annotations

import numpy as np
import torch

from ..qtensor import QuantizedWeight

BLOCK = 32


def _block_scales(qw: QuantizedWeight) -> np.ndarray:
    """[out, in / 32] fp16: each block's scale (groups are whole blocks: one scale per block)."""
    out_f, in_f = qw.shape
    scale = qw.layout.expand(qw.params)["scale"].expand(out_f, in_f)  # [out, in] fp16-exact float32
    d = scale[:, ::BLOCK]
    if not torch.equal(d.repeat_interleave(BLOCK, dim=1), scale):
        raise ValueError("a 32-weight block spans two groups; groups must be whole blocks")
    return d.numpy().astype(np.float16)


def pack_blocks(qw: QuantizedWeight, ggml_type: str) -> np.ndarray:
    """[out, n_blocks * block_bytes] uint8: the weight as GGUF `ggml_type` blocks."""
    out_f, in_f = qw.shape
    if in_f % BLOCK:
        raise ValueError(f"input width {in_f} is not a multiple of {BLOCK}")
    nb = in_f // BLOCK
    d = _block_scales(qw).reshape(out_f, nb, 1).view(np.uint8)  # [out, nb, 2]
    u = qw.codes.numpy().astype(np.uint8).reshape(out_f, nb, BLOCK)  # [out, nb, 32]
    if ggml_type == "Q4_0":
        qs = u[..., :16] | (u[..., 16:] << 4)
        blocks = np.concatenate([d, qs], axis=-1)
    elif ggml_type == "Q5_0":
        low = u & 0x0F
        qs = low[..., :16] | (low[..., 16:] << 4)
        high = ((u >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
        qh = high.sum(axis=-1, dtype=np.uint32).astype("<u4").reshape(out_f, nb, 1).view(np.uint8)  # [out, nb, 4]
        blocks = np.concatenate([d, qh, qs], axis=-1)
    elif ggml_type == "Q8_0":
        q = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d, q], axis=-1)
    else:
        raise ValueError(f"no packer for GGUF type {ggml_type}")
    return np.ascontiguousarray(blocks.reshape(out_f, -1))
