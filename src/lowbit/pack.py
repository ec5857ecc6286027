"""Codes of any width from 1 to 8 bits packed into bytes, and back, bit-exact.

Layout: the codes are taken in row-major order and their bits laid down least significant
first, one after the other, into a little-endian bit stream; the stream is cut into bytes and
its last byte padded with zero bits. n codes of b bits take ceil(n * b / 8) bytes exactly.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # codes per step, to bound the temporary bit tensors


def packed_nbytes(n_codes: int, bits: int) -> int:
    return -(-n_codes * bits // 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes are 1 to 8 bits wide, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 `codes` (any shape, each < 2**bits) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code exceeds the {bits}-bit range (max {int(flat.max())})")
    if bits == 8:
        return flat.clone()
    # Work in chunks whose bit count is a multiple of 8 so every chunk ends on a byte boundary.
    chunk = _CHUNK - _CHUNK % 8
    shifts = torch.arange(bits, dtype=torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    out = []
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        stream = ((part.unsqueeze(1) >> shifts) & 1).reshape(-1)  # [n * bits] bits, LSB first
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else flat.new_zeros(0)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n_codes` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, {n_codes} codes of {bits} bits need "
            f"{packed_nbytes(n_codes, bits)}"
        )
    if bits == 8:
        return packed.clone()
    chunk_codes = _CHUNK - _CHUNK % 8  # codes per step; chunk_codes * bits is a multiple of 8
    shifts8 = torch.arange(8, dtype=torch.uint8)
    weights = (1 << torch.arange(bits, dtype=torch.int32))
    out = []
    for start in range(0, n_codes, chunk_codes):
        count = min(chunk_codes, n_codes - start)
        b0 = start * bits // 8
        part = packed[b0 : b0 + packed_nbytes(count, bits)]
        stream = ((part.unsqueeze(1) >> shifts8) & 1).reshape(-1)[: count * bits]
        out.append((stream.reshape(count, bits).to(torch.int32) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else packed.new_zeros(0)
