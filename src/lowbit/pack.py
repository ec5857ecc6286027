"""Codes of any width from 1 to 32 bits packed into bytes, and back, bit-exact.

Layout, 1 to 8 bits: the codes are taken in row-major order and their bits laid down least
significant first, one after the other, into a little-endian bit stream; the stream is cut into
bytes and its last byte padded with zero bits. n codes of b bits take ceil(n * b / 8) bytes exactly.

Eight b-bit codes fill exactly b bytes, so both directions work on groups of eight codes held in
one int64 (at most 64 bits), with shifts only.

9 to 32 bits (codebook and pyramid indices): the low byte of every code (n bytes), then the
remaining b - 8 high bits of every code packed the same way (recursively): n + ceil(n * (b - 8) / 8)
= ceil(n * b / 8) bytes, the same count. Such codes come and go as int32 (up to 16 bits) or int64.
"""

from __future__ import annotations

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    return -(-n_codes * bits // 8)


MAX_BITS = 32


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codes are 1 to {MAX_BITS} bits wide, got {bits}")


def code_dtype(bits: int) -> torch.dtype:
    """The dtype codes of `bits` bits are held in: uint8 up to 8 bits, int32 up to 16, int64 above."""
    return torch.uint8 if bits <= 8 else torch.int32 if bits <= 16 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `codes` (any shape, each in [0, 2**bits)) into a flat uint8 tensor."""
    _check_bits(bits)
    if bits > 8:
        return _pack_wide(codes.reshape(-1).to(torch.int64), bits)
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code exceeds the {bits}-bit range (max {int(flat.max())})")
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, uint8 shifts only
        per = 8 // bits
        lanes = torch.cat([flat, flat.new_zeros((-n) % per)]).reshape(-1, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (lanes << shifts).sum(1, dtype=torch.uint8)
    groups = torch.cat([flat, flat.new_zeros((-n) % 8)]).reshape(-1, 8).to(torch.int64)
    code_shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (groups << code_shifts).sum(1, keepdim=True)  # [n/8, 1]: eight codes, bits apart
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(n, bits)].clone()


def _pack_wide(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """9-32-bit codes: the low-byte plane, then the high bits packed at bits - 8."""
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"a code is outside the {bits}-bit range ({int(flat.min())} to {int(flat.max())})")
    low = (flat & 0xFF).to(torch.uint8)
    return torch.cat([low, pack_codes(flat >> 8, bits - 8)])


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n_codes` codes as a flat tensor (`code_dtype(bits)`)."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, {n_codes} codes of {bits} bits need "
            f"{packed_nbytes(n_codes, bits)}"
        )
    if bits > 8:
        dtype = code_dtype(bits)
        high = unpack_codes(packed[n_codes:], bits - 8, n_codes).to(dtype)
        return packed[:n_codes].to(dtype) | (high << 8)
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:n_codes].clone()
    padded = torch.cat([packed, packed.new_zeros((-packed.numel()) % bits)]).reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (padded << byte_shifts).sum(1, keepdim=True)  # [n/8, 1]
    code_shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = ((words >> code_shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)
    return codes[:n_codes].clone()
