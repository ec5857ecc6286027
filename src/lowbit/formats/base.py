"""The grid interface that every number format implements.

A grid is a set of representable values with a few parameters (a scale, a zero point, ...)
shared by one block of weights. Algorithms (RTN, GPTQ, ...) only ever call the four methods
below, so any algorithm works with any grid that implements them:

    params = grid.fit(w)             # w: [rows, k]; every row is one block; params: [rows, 1] each
                                     # (a grid with fit_span > 1 fits that many blocks of a row at once)
    codes  = grid.encode(w, params)  # integer codes in [0, 2**grid.bits), uint8, same shape as w
    w_hat  = grid.decode(codes, params)
    grid.param_fields                # how each parameter is stored, hence what it costs in bits
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..pack import pack_codes, packed_nbytes, unpack_codes

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamField:
    """How one per-block parameter is stored: an fp16 number, or an unsigned integer code
    packed at `bits` width (a zero point, for instance). `shared` > 1: one stored value serves
    that many consecutive blocks of a row (a K-quant super-block scale: the value is repeated in
    each block's parameters, and stored once)."""

    name: str
    kind: Literal["float16", "code"]
    bits: int
    shared: int = 1

    @classmethod
    def fp16(cls, name: str, shared: int = 1) -> "ParamField":
        return cls(name, "float16", 16, shared)

    @classmethod
    def code(cls, name: str, bits: int) -> "ParamField":
        return cls(name, "code", bits)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round a float32 parameter to the nearest fp16 value that is finite and non-zero in
    magnitude, and return it as float32. Parameters are fitted this way so that what is stored
    (fp16) decodes to exactly what the algorithm used."""
    tiny = torch.finfo(torch.float16).tiny
    big = torch.finfo(torch.float16).max
    mag = x.abs().clamp(min=tiny, max=big)
    return (torch.where(x < 0, -mag, mag)).to(torch.float16).to(torch.float32)


class Grid(ABC):
    """A scalar number format applied block-wise (see the module docstring)."""

    #: width of one code, in bits (codes lie in [0, 2**bits))
    bits: int
    #: a block size the format itself prescribes (MXFP4: 32), overriding the recipe's group size
    fixed_group_size: int | None = None
    #: blocks of a row fitted together (K-quants: the 8 or 16 blocks of a 256-weight super-block,
    #: whose scales share one fp16 scale): `fit` then takes [rows, fit_span * block] and returns
    #: [rows, fit_span] per parameter
    fit_span: int = 1

    @property
    @abstractmethod
    def name(self) -> str:
        """The format's name as recipes and the CLI spell it (`int4`, ...)."""

    @property
    @abstractmethod
    def param_fields(self) -> tuple[ParamField, ...]:
        """The per-block parameters, in storage order."""

    @abstractmethod
    def fit(self, w: torch.Tensor) -> Params:
        """Fit parameters for each row of `w: [rows, k]`; each returned tensor is [rows, 1]."""

    @abstractmethod
    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Map `w: [rows, k]` to uint8 codes in [0, 2**bits) with `params` ([rows, 1] each)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """The float32 values that `codes` stand for under `params`."""

    @property
    def decoder(self) -> "Grid":
        """The grid whose decode this one uses: itself, or for a wrapper that only changes the fit
        (clip, mse_fit) the wrapped grid's decoder. Export and the runtime dispatch on it."""
        return self

    def spec(self) -> dict[str, Any]:
        """A JSON-able description from which `formats.grid_from_spec` rebuilds this grid."""
        return {"format": self.name}

    def with_precision(self, bits: int) -> "Grid | None":
        """This grid decoding its stored codes at another precision, or None if it cannot
        (only nested grids can: `formats.nested`)."""
        return None

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Round `w` onto the grid: decode(encode(w))."""
        return self.decode(self.encode(w, params), params)

    # Storage of the codes. The default packs `bits`-wide codes densely; a format whose codes pack
    # tighter (ternary: 5 trits per byte) overrides all three.
    def packed_nbytes(self, n_codes: int) -> int:
        return packed_nbytes(n_codes, self.bits)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes (any shape) -> flat uint8 bytes."""
        return pack_codes(codes, self.bits)

    def unpack(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        """Flat bytes -> the first `n_codes` codes, flat uint8."""
        return unpack_codes(packed, self.bits, n_codes)

    @property
    def param_bits(self) -> float:
        """Bits that one block's parameters cost in storage (shared fields: their share)."""
        return sum(f.bits / f.shared for f in self.param_fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class FitWrapper(Grid):
    """A grid that changes only how `inner`'s parameters are fitted (clipping, an error search):
    storage, encode and decode are `inner`'s, so what it writes decodes as `inner` decodes.
    Subclasses implement `fit` and `spec`."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bits = inner.bits
        self.fixed_group_size = inner.fixed_group_size
        self.fit_span = inner.fit_span

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def decoder(self) -> Grid:
        return self.inner.decoder

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return self.inner.param_fields

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return self.inner.encode(w, params)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return self.inner.decode(codes, params)

    def packed_nbytes(self, n_codes: int) -> int:
        return self.inner.packed_nbytes(n_codes)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inner.pack(codes)

    def unpack(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        return self.inner.unpack(packed, n_codes)
