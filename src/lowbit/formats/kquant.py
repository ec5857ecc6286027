"""llama.cpp's K-quant grids: integer codes whose per-block scales are themselves quantized, to
6 or 8 bits, under one fp16 scale per 256-weight super-block ("double quantization").

    int4_k  (Q4_K)  blocks of 32, 8 per super-block:  w = (d * sc) * q - (dmin * m),  q 0..15
    int5_k  (Q5_K)  as int4_k with q 0..31
    int6_k  (Q6_K)  blocks of 16, 16 per super-block: w = (d * s) * (q - 32),  q 0..63, s = sc - 128

sc, m: 6-bit codes per block (int6_k: s a signed 8-bit scale, stored as the code sc = s + 128);
d, dmin: fp16, one per super-block (`ParamField.shared`). Bits per weight, everything counted:
4.5, 5.5 and 6.5625, as llama.cpp's blocks. Decoding multiplies d by the small integer first (exact
in float32), then by the code, then subtracts (one rounding): the order of ggml's and gguf-py's
dequantizers, so an exported super-block decodes to these values bit for bit.

Fit (per super-block; `fit_span` blocks at once): each block's own step and min as for an
asymmetric integer grid (int6_k: a signed step that puts the largest-magnitude weight on the
extra level, as ggml's Q6_K and lowbit's symmetric grids do), then d = max step / 63 (int6_k:
the largest-magnitude step / -128, ggml's rule), and each block's step and min rounded onto that
lattice, trying the neighbouring lattice points and keeping the pair with the least squared
error on the block. The codes are then chosen for exactly the scales that will be stored, so RTN
and GPTQ optimise what llama.cpp runs.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Grid, ParamField, Params

SUPER_BLOCK = 256


def _fp16_any(x: torch.Tensor) -> torch.Tensor:
    """Nearest fp16 value (zero allowed, any sign), as float32."""
    big = torch.finfo(torch.float16).max
    return x.clamp(-big, big).to(torch.float16).to(torch.float32)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, 1.0), 0.0)


class KQuantGrid(Grid):
    """Q4_K / Q5_K (affine, `bits` 4 or 5) and Q6_K (symmetric, `bits` 6); see the module docstring."""

    def __init__(self, bits: int) -> None:
        if bits not in (4, 5, 6):
            raise ValueError(f"K-quant grids have 4, 5 or 6 bits (Q4_K, Q5_K, Q6_K), got {bits}")
        self.bits = bits
        self.maxq = 2**bits - 1
        self.affine = bits != 6
        self.fixed_group_size = 32 if self.affine else 16
        self.fit_span = SUPER_BLOCK // self.fixed_group_size

    @property
    def name(self) -> str:
        return f"int{self.bits}_k"

    @property
    def ggml_type(self) -> str:
        return f"Q{self.bits}_K"

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        if self.affine:
            return (ParamField.fp16("d", self.fit_span), ParamField.fp16("dmin", self.fit_span),
                    ParamField.code("sc", 6), ParamField.code("m", 6))
        return (ParamField.fp16("d", self.fit_span), ParamField.code("sc", 8))

    # ---- decode -----------------------------------------------------------------------------
    def _step(self, params: Params) -> torch.Tensor:
        sc = params["sc"] if self.affine else params["sc"] - 128.0
        return params["d"] * sc  # exact: fp16 times a small integer

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        step = self._step(params)
        if self.affine:
            q = torch.round(_safe_div(w.float() + params["dmin"] * params["m"], step))
        else:
            q = torch.round(_safe_div(w.float(), step)) + 32.0
        return q.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        step = self._step(params)
        if self.affine:
            return step * codes.float() - params["dmin"] * params["m"]
        return step * (codes.float() - 32.0)

    # ---- fit --------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor) -> Params:
        """w: [rows, fit_span * block] (one super-block per row) -> [rows, fit_span] per parameter."""
        rows, k = w.shape
        span, blk = self.fit_span, self.fixed_group_size
        if k != span * blk:
            raise ValueError(f"{self.name} fits whole {SUPER_BLOCK}-weight super-blocks; got {k} columns")
        wb = w.float().reshape(rows, span, blk)  # [rows, span, block]
        return self._fit_affine(wb) if self.affine else self._fit_symmetric(wb)

    def _best(self, wb: torch.Tensor, candidates: list[Params]) -> Params:
        """Of several candidate parameter sets ([rows, span] each), per block the one whose
        quantization of `wb: [rows, span, block]` has the least squared error."""
        errs = []
        for p in candidates:
            p3 = {n: v.unsqueeze(-1) for n, v in p.items()}
            errs.append(((self.quantize(wb, p3) - wb) ** 2).sum(-1))
        pick = torch.stack(errs).argmin(0)  # [rows, span]
        return {n: torch.stack([c[n] for c in candidates]).gather(0, pick.unsqueeze(0))[0] for n in candidates[0]}

    def _fit_affine(self, wb: torch.Tensor) -> Params:
        lo = wb.amin(-1).clamp(max=0)  # [rows, span]: the range includes 0, as ggml's make_qkx2_quants
        hi = wb.amax(-1).clamp(min=0)
        step, mn = (hi - lo) / self.maxq, -lo
        d = _fp16_any(step.amax(-1, keepdim=True) / 63).expand_as(step)
        dmin = _fp16_any(mn.amax(-1, keepdim=True) / 63).expand_as(step)
        sc0 = _safe_div(step, d).round().clamp(0, 63)
        m0 = _safe_div(mn, dmin).round().clamp(0, 63)
        cands = [{"d": d, "dmin": dmin, "sc": (sc0 + a).clamp(0, 63), "m": (m0 + b).clamp(0, 63)}
                 for a in (0, 1, -1) for b in (0, 1, -1)]
        return {n: v.contiguous() for n, v in self._best(wb, cands).items()}

    def _fit_symmetric(self, wb: torch.Tensor) -> Params:
        m = wb.gather(-1, wb.abs().argmax(-1, keepdim=True))[..., 0]  # [rows, span]: largest magnitude, signed
        step = -m / 32  # m lands on code 0 (the extra level)
        big = step.gather(-1, step.abs().argmax(-1, keepdim=True))  # [rows, 1]
        d = _fp16_any(-big / 128).expand_as(step)  # ggml's Q6_K: the largest step is -128 * d
        s0 = _safe_div(step, d).round().clamp(-128, 127)
        cands = [{"d": d, "sc": (s0 + a).clamp(-128, 127) + 128} for a in (0, 1, -1)]
        return {n: v.contiguous() for n, v in self._best(wb, cands).items()}

    def spec(self) -> dict[str, Any]:
        return {"format": self.name}

