"""Lookup-table grids: every code indexes a fixed table of levels, times an fp16 absmax scale.

* `nf4`, `nf3` (any of `nf2` ... `nf8`): NormalFloat from QLoRA (Dettmers et al., 2023, "QLoRA:
  Efficient Finetuning of Quantized LLMs"): the levels are quantiles of a standard normal,
  normalised to [-1, 1], with an exact zero; 2^(b-1) positive and 2^(b-1) - 1 negative levels.
  The quantile offset generalises QLoRA's 4-bit choice 1 - (1/32 + 1/30) / 2 to
  1 - (1/(2N) + 1/(2(N-1))) / 2 for N = 2^b levels.
* `lut` with `levels=[...]`: a table given by the user (up to 256 distinct finite values, in
  any order); a code is the index, in the given order, of the nearest level. The table is part
  of the spec, so an artifact rebuilds it.

The scale of one block is absmax / max|level| (fp16), so the largest magnitude is represented.
Encoding is nearest-level: a bucketize against the midpoints of the sorted table; a value exactly
on a midpoint goes to the lower level.

This module also holds the table machinery that the other non-uniform grids share:
`nearest_index`, `TableGrid` (a signed table, codes = table index) and `SignMagnitudeGrid`
(a sign bit plus a magnitude table, as in minifloats and log grids).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .base import Grid, ParamField, Params, round_to_fp16


def nearest_index(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of the ascending `table` for every element of `x`.
    A value exactly halfway between two entries goes to the lower one."""
    table = table.to(x.device)
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids)


def absmax_scale(w: torch.Tensor, top: float) -> Params:
    """fp16 scale per row that maps the row's absmax onto `top` (1 for an all-zero row)."""
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    return {"scale": round_to_fp16(torch.where(absmax > 0, absmax / top, 1.0))}


class TableGrid(Grid):
    """Codes index an ascending table of levels; w ~ scale * table[code], fp16 absmax scale."""

    table: torch.Tensor  # float32, ascending, distinct

    def _set_table(self, table: torch.Tensor) -> None:
        table = table.to(torch.float32)
        if table.numel() < 2 or table.numel() > 2**self.bits:
            raise ValueError(f"a {self.bits}-bit table holds 2 to {2**self.bits} levels, got {table.numel()}")
        if not (table[1:] > table[:-1]).all():
            raise ValueError("table levels must be distinct and ascending")
        self.table = table

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"),)

    def fit(self, w: torch.Tensor) -> Params:
        return absmax_scale(w, float(self.table.abs().max()))

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return nearest_index(w.float() / params["scale"], self.table).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        idx = codes.long().clamp(max=self.table.numel() - 1)
        return self.table.to(codes.device)[idx] * params["scale"]


class SignMagnitudeGrid(Grid):
    """A sign bit (the top bit of the code) and a magnitude index into an ascending table whose
    first entry is 0. Negative values that round to zero keep their sign (the code for -0), so
    every code decodes to a value that encodes back to the same code."""

    mags: torch.Tensor  # float32, ascending, mags[0] == 0, 2**(bits - 1) entries

    def _set_mags(self, mags: torch.Tensor) -> None:
        mags = mags.to(torch.float32)
        if mags.numel() != 2 ** (self.bits - 1) or float(mags[0]) != 0.0 or not (mags[1:] > mags[:-1]).all():
            raise ValueError("a sign-magnitude table needs 2**(bits-1) ascending magnitudes starting at 0")
        self.mags = mags

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"),)

    def fit(self, w: torch.Tensor) -> Params:
        return absmax_scale(w, float(self.mags[-1]))

    def _scale(self, params: Params) -> torch.Tensor:
        """The float multiplier of every element's magnitude (overridden by coded scales)."""
        return params["scale"]

    def encode_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Codes for values already divided by the scale."""
        mag = nearest_index(x.abs(), self.mags)
        sign = torch.signbit(x).to(torch.int64) << (self.bits - 1)
        return (mag | sign).to(torch.uint8)

    def decode_unit(self, codes: torch.Tensor) -> torch.Tensor:
        half = 2 ** (self.bits - 1)
        c = codes.long()
        m = self.mags.to(codes.device)[c & (half - 1)]
        return torch.where(c >= half, -m, m)

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return self.encode_unit(w.float() / self._scale(params))

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return self.decode_unit(codes) * self._scale(params)


def normal_float_levels(bits: int) -> torch.Tensor:
    """NormalFloat levels for `bits` bits: 2^(b-1) positive and 2^(b-1) - 1 negative standard-normal
    quantiles, normalised to a maximum of 1, plus an exact 0 (QLoRA's construction)."""
    n = 2**bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    n_pos, n_neg = n // 2, n // 2 - 1
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    return (levels / levels.abs().max()).sort().values.to(torch.float32)


class NormalFloatGrid(TableGrid):
    """NormalFloat (QLoRA): normal quantiles, absmax-scaled, fp16 scale per block."""

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"NormalFloat grids have 2 to 8 bits, got {bits}")
        self.bits = bits
        self._set_table(normal_float_levels(bits))

    @property
    def name(self) -> str:
        return f"nf{self.bits}"


class LookupGrid(TableGrid):
    """A user-given table of levels (stored in the spec); code = index of the nearest level in
    the order given; fp16 absmax scale per block."""

    def __init__(self, levels: Sequence[float]) -> None:
        values = torch.tensor([float(v) for v in levels], dtype=torch.float32)
        if values.ndim != 1 or not 2 <= values.numel() <= 256:
            raise ValueError(f"a lookup table needs 2 to 256 levels, got {values.numel()}")
        if not torch.isfinite(values).all() or float(values.abs().max()) == 0:
            raise ValueError("lookup levels must be finite and not all zero")
        self.levels = values  # the user's order: codes index this
        self.bits = max(1, math.ceil(math.log2(values.numel())))
        self.order = torch.argsort(values, stable=True)  # sorted position -> user index
        self._set_table(values[self.order])  # refuses duplicates

    @property
    def name(self) -> str:
        return "lut"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "levels": [float(v) for v in self.levels]}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        idx = nearest_index(w.float() / params["scale"], self.table)
        return self.order.to(w.device)[idx].to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        idx = codes.long().clamp(max=self.levels.numel() - 1)
        return self.levels.to(codes.device)[idx] * params["scale"]
