"""Minifloat (ExMy) grids, as studied for weights in LLM-FP4 (Liu et al., 2023, "LLM-FP4: 4-Bit
Floating-Point Quantized Transformers") and FLIQS, plus the OCP MXFP4 and NVIDIA NVFP4 block formats.

`fp{n}_e{E}m{M}` (n = 1 + E + M, 3 to 8 bits, E >= 1): a sign bit, E exponent bits, M mantissa
bits. Every bit pattern is a finite number (no inf/NaN codes, as in OCP FP4/FP6 and LLM-FP4);
so `fp8_e4m3` here tops out at 480 rather than OCP's 448 and `fp8_e5m2` has no infinities.
Magnitude of exponent field e and mantissa field k:
    e > 0:                         2^(e - bias) * (1 + k / 2^M)
    e = 0, subnormals (default):   2^(1 - bias) * (k / 2^M)
    e = 0, subnormals=False:       0 for k = 0, else 2^(-bias) * (1 + k / 2^M)   (no subnormal
                                   range: the exponent-0 codes are ordinary normal numbers)
Codes are sign-magnitude bit patterns (sign in the top bit); a negative value that rounds to
zero keeps its sign (the -0 code). Encoding is round-to-nearest on the magnitude table (a tie
goes to the smaller magnitude); values beyond the largest magnitude saturate.

Scale: one fp16 per block maps the block's absmax onto the format's largest value. Decoding is
w = scale * v(code) * 2^-emax (emax = the exponent of the largest value v_max, so the table
v * 2^-emax tops out in [1, 2)): the exact power of two keeps the fp16 scale in fp16's normal
range for wide exponents (e5m2 reaches 2^16, e7m0 2^64). The `bias` option (default 2^(E-1) - 1) shifts every level by
the same power of two, so with a fitted scale it changes no quantized value (the exponent bias
and the scale are one degree of freedom, as LLM-FP4 observes); it is kept in the spec so that
codes keep their ExMy meaning.

Presets (E2M1 elements, values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives):
* `mxfp4` (OCP Microscaling spec v1.0): blocks of 32 share a power-of-two scale 2^(x - 127),
  stored as its 8-bit E8M0 code x. `scale_rule="ocp"` (default) takes the spec's shared
  exponent floor(log2(absmax)) - 2 (the block max may saturate at 6); `"mse"` picks, per block,
  the better of that exponent and the next one up. 4 + 8/32 = 4.25 bits per weight.
* `nvfp4`: blocks of 16 with a scale stored as an 8-bit FP8 E4M3 code (OCP E4M3, max 448;
  the sign bit is always 0 and 0x7F, NaN, is never produced). NVFP4 multiplies the decoded
  E4M3 scale by a per-tensor FP32 scale; the Grid interface stores parameters per block only,
  so here that second-level scale is a fixed power of two, 2^tensor_scale_exp (default 2^-7),
  held in the spec and costing no stored bits. With it, blocks whose absmax lies in
  [6 * 2^-13, 6 * 448 * 2^-7] = [7.3e-4, 21] get a normal E4M3 scale (the full 3-bit scale
  precision a per-tensor scale gives); larger blocks saturate, smaller ones get a subnormal,
  coarser scale. `scale_rule="nearest"` (default) rounds absmax / 6 to the nearest E4M3 value;
  `"mse"` picks the better of the two neighbours per block. 4 + 8/16 = 4.5 bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ParamField, Params
from .lookup import SignMagnitudeGrid, nearest_index


def exmy_magnitudes(exp_bits: int, man_bits: int, bias: int, subnormals: bool = True) -> torch.Tensor:
    """The non-negative values of an ExMy format, indexed by the magnitude bits (ascending), float64."""
    codes = torch.arange(2 ** (exp_bits + man_bits), dtype=torch.int64)
    e = (codes >> man_bits).double()
    frac = (codes & (2**man_bits - 1)).double() / 2**man_bits
    normal = torch.exp2(e - bias) * (1 + frac)
    if subnormals:
        return torch.where(e == 0, 2.0 ** (1 - bias) * frac, normal)
    return torch.where(codes == 0, 0.0, normal)


E2M1 = exmy_magnitudes(2, 1, 1).float()  # 0, 0.5, 1, 1.5, 2, 3, 4, 6
E4M3 = exmy_magnitudes(4, 3, 7)[:127].float()  # OCP E4M3, positive codes 0..126 (0x7F is NaN)


class MinifloatGrid(SignMagnitudeGrid):
    """ExMy minifloat (LLM-FP4, FLIQS) with an fp16 absmax scale per block."""

    def __init__(self, exp_bits: int, man_bits: int, subnormals: bool = True, bias: int | None = None) -> None:
        bits = 1 + exp_bits + man_bits
        if exp_bits < 1 or man_bits < 0 or not 3 <= bits <= 8:
            raise ValueError(f"minifloats need >= 1 exponent bit and 3 to 8 bits in all, got e{exp_bits}m{man_bits}")
        if not isinstance(subnormals, bool):
            raise ValueError(f"subnormals is true or false, got {subnormals!r}")
        if bias is not None and (isinstance(bias, bool) or int(bias) != bias):
            raise ValueError(f"the exponent bias must be an integer, got {bias!r}")
        self.bits = bits
        self.exp_bits, self.man_bits = exp_bits, man_bits
        self.subnormals = bool(subnormals)
        self.bias = 2 ** (exp_bits - 1) - 1 if bias is None else int(bias)
        mags = exmy_magnitudes(exp_bits, man_bits, self.bias, self.subnormals)
        emax = 2**exp_bits - 1 - self.bias  # exponent of the largest value
        self._set_mags(mags * 2.0 ** (-emax))  # exact: a power of two; max in [1, 2)

    @property
    def name(self) -> str:
        return f"fp{self.bits}_e{self.exp_bits}m{self.man_bits}"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "subnormals": self.subnormals, "bias": self.bias}


def _block_sq_error(grid: SignMagnitudeGrid, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = grid.decode_unit(grid.encode_unit(w / scale)) * scale
    return ((q - w) ** 2).sum(dim=1, keepdim=True)


class MXFP4Grid(SignMagnitudeGrid):
    """OCP MXFP4: E2M1 elements, blocks of 32, shared power-of-two scale as an 8-bit E8M0 code."""

    bits = 4
    fixed_group_size = 32

    def __init__(self, scale_rule: str = "ocp") -> None:
        if scale_rule not in ("ocp", "mse"):
            raise ValueError(f"mxfp4 scale_rule is 'ocp' or 'mse', got {scale_rule!r}")
        self.scale_rule = scale_rule
        self._set_mags(E2M1)

    @property
    def name(self) -> str:
        return "mxfp4"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "scale_rule": self.scale_rule}

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.code("scale_exp", 8),)

    def _scale(self, params: Params) -> torch.Tensor:
        code = params["scale_exp"]
        return torch.ldexp(torch.ones_like(code), code - 127)

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        absmax = w.abs().amax(dim=1, keepdim=True)
        _, e = torch.frexp(absmax)  # absmax = m * 2^e, m in [0.5, 1): floor(log2 absmax) = e - 1
        x = torch.where(absmax > 0, e - 1 - 2, -127).float()  # E2M1's largest exponent is 2
        code = (x + 127).clamp(1, 254)  # 0 (2^-127, subnormal in fp32) and 255 (NaN) are not produced
        if self.scale_rule == "mse":
            up = (code + 1).clamp(max=254)
            err = _block_sq_error(self, w, self._scale({"scale_exp": code}))
            err_up = _block_sq_error(self, w, self._scale({"scale_exp": up}))
            code = torch.where(err_up < err, up, code)
        return {"scale_exp": code}


class NVFP4Grid(SignMagnitudeGrid):
    """NVIDIA NVFP4: E2M1 elements, blocks of 16, scale stored as an FP8 E4M3 code times a fixed
    power-of-two tensor scale (see the module docstring)."""

    bits = 4
    fixed_group_size = 16

    def __init__(self, scale_rule: str = "nearest", tensor_scale_exp: int = -7) -> None:
        if scale_rule not in ("nearest", "mse"):
            raise ValueError(f"nvfp4 scale_rule is 'nearest' or 'mse', got {scale_rule!r}")
        if isinstance(tensor_scale_exp, bool) or int(tensor_scale_exp) != tensor_scale_exp or not -60 <= tensor_scale_exp <= 60:
            raise ValueError(f"nvfp4 tensor_scale_exp is an integer in [-60, 60], got {tensor_scale_exp!r}")
        self.scale_rule = scale_rule
        self.tensor_scale_exp = int(tensor_scale_exp)
        self._set_mags(E2M1)

    @property
    def name(self) -> str:
        return "nvfp4"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "scale_rule": self.scale_rule, "tensor_scale_exp": self.tensor_scale_exp}

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.code("scale", 8),)

    def _scale(self, params: Params) -> torch.Tensor:
        code = params["scale"].long().clamp(0, E4M3.numel() - 1)
        return E4M3.to(code.device)[code] * 2.0**self.tensor_scale_exp

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        target = w.abs().amax(dim=1, keepdim=True) / 6 * 2.0 ** (-self.tensor_scale_exp)
        top = E4M3.numel() - 1
        if self.scale_rule == "nearest":
            code = nearest_index(target, E4M3).clamp(1, top).float()
            return {"scale": code}
        table = E4M3.to(target.device)
        above = torch.searchsorted(table, target.contiguous()).clamp(1, top)  # first value >= target
        below = torch.where(table[above] > target, above - 1, above).clamp(1, top)
        above, below = above.float(), below.float()
        err_above = _block_sq_error(self, w, self._scale({"scale": above}))
        err_below = _block_sq_error(self, w, self._scale({"scale": below}))
        return {"scale": torch.where(err_below < err_above, below, above)}
