"""A QuantLinear's integer weight as the C kernels read it, and the product with it.

The kernels read the module's own buffers in place, nothing copied or widened: the packed codes
(lowbit's LSB-first bit stream at 2 to 8 bits: for 4 bits two codes per byte, for 8 one byte
each; 4 bits has its own kernel, the other widths one generic kernel), the fp16 scales [out, n_groups],
and for asymmetric grids the zero points unpacked to one byte per group (symmetric grids pass
their constant zero). For int4 with groups of 32 that is 0.5625 bytes per weight, the artifact's
own size, against fp32's 4. Batch-few inputs (decode) run the product kernel; more rows
(prefill) dequantize once into fp32, bit for bit as lowbit decodes, then one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats.int import IntGrid
from ..pack import unpack_codes
from .kernels import MAX_BATCH, library

BLOCK = 32  # the kernels read whole blocks of 32 weights


def _int_grid(grid) -> IntGrid | None:
    inner = grid.decoder  # clipping or an MSE fit change the fit, not the decode
    return inner if type(inner) is IntGrid else None


@dataclass
class PackedInt:
    bits: int
    out_features: int
    in_features: int
    group: int  # columns per group (the whole row for per-channel / per-tensor layouts)
    n_groups: int
    codes: torch.Tensor  # the module's packed buffer, uint8
    scale: torch.Tensor  # [out, n_groups] float16 (the module's buffer where its layout is per group)
    zero: torch.Tensor | None  # [out, n_groups] uint8, or None: every zero point is `zero_const`
    zero_const: float

    @classmethod
    def from_module(cls, layer) -> "PackedInt | None":
        """The packed view of a QuantLinear, or None when the kernels do not cover its grid/layout."""
        grid = _int_grid(layer.grid)
        layout = layer.layout
        if grid is None or not 2 <= grid.bits <= 8 or layout.in_features % BLOCK:
            return None
        group = layout.effective_group_size
        if group % BLOCK or library() is None:
            return None
        out_f, n_groups = layout.out_features, layout.n_groups
        # per-channel/per-tensor layouts share scales across rows: expanded (a small copy); grouped: the buffer itself
        scale = layer.scale.reshape(layout.param_rows, n_groups).expand(out_f, n_groups).contiguous()
        zero = None
        if not grid.symmetric:
            zero = unpack_codes(layer.zero, grid.bits, layout.n_param_sets).to(torch.uint8)
            zero = zero.reshape(layout.param_rows, n_groups).expand(out_f, n_groups).contiguous()
        return cls(grid.bits, out_f, layout.in_features, group, n_groups, layer.codes, scale, zero, float(2 ** (grid.bits - 1)))

    def _zero_args(self) -> tuple:
        return (None if self.zero is None else self.zero.data_ptr(), self.zero_const)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32, equal to the module's own decode bit for bit."""
        w = torch.empty(self.out_features, self.in_features)
        library().lowbit_dequant(self.codes.data_ptr(), self.bits, self.scale.data_ptr(), *self._zero_args(), w.data_ptr(),
                                 self.out_features, self.in_features, self.group, self.n_groups)
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, in] float32 contiguous, rows <= MAX_BATCH -> [rows, out]."""
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        work = torch.empty(rows * (self.n_groups + (self.in_features if self.bits == 4 else 0)))  # [x de-interleaved (int4),] group sums
        lib = library()
        args = (x.data_ptr(), self.scale.data_ptr(), *self._zero_args(), y.data_ptr(), rows, self.out_features, self.in_features,
                self.group, self.n_groups, work.data_ptr())
        if self.bits == 4:
            lib.lowbit_gemv_int4(self.codes.data_ptr(), *args)
        else:
            lib.lowbit_gemv_bits(self.codes.data_ptr(), self.bits, *args)
        return y

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, weight=None) -> torch.Tensor:
        """F.linear(x, W, bias) for x: [..., in] float32; `weight()` gives W for many rows (the
        module's dequantize, which may cache it), default this view's own decode."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] <= MAX_BATCH:
            y = self.matmul(x2)
            if bias is not None:
                y += bias
        else:
            y = F.linear(x2, (weight or self.dequantize)(), bias)
        return y.reshape(*lead, self.out_features)
