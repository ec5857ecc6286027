"""Nested integers with Double Rounding (Huang et al., 2024, "Nearly Lossless Adaptive Bit
Switching"): one `top`-bit integer code per weight (8 bits for `nested8`) and an fp16 scale s per
block; every lower precision p is derived from the stored code at load time by rounding it
again (not truncating), with the p-bit scale s * 2^(top-p):

    m     = clamp(floor(w / s), -2^(top-1), 2^(top-1) - 1)      stored code m + 2^(top-1)
    top:    w_top = (m + 1/2) * s                               (levels at odd multiples of s/2)
    p-bit:  q_p = clamp(round((m + 1/2) / 2^(top-p)), -2^(p-1), 2^(p-1) - 1),   w_p = q_p * s * 2^(top-p)

`precision` (the p that `decode` produces, default `top`) is a load-time choice:
`lowbit.load(path, bits=4)` rebuilds every nested module at 4 bits (`with_precision`). Encoding
always yields `top`-bit codes, so RTN and GPTQ work unchanged at any precision.

Why the half-step offset of the top grid (our change to the paper's integer grid): if the top
levels were the integers, a p-bit rounding boundary (an odd multiple of 2^(top-p-1)) would be a
top level itself, and every weight stored there would meet a tie when rounded again. Rounding
twice then errs for the weights just below a boundary: at 6 from 8 bits 1/8 of all weights round
the wrong way (+19% squared error over rounding directly, +30% KL on the reference model). With
top levels at half-integers the top rounding cells [m, m + 1) lie inside one p-bit cell each, so
rounding the stored code again gives exactly the p-bit rounding of the weight: double rounding
equals direct rounding at every precision, for the shared scale. The top grid is symmetric with
no zero (+-1/2 s ... +-(2^(top-1) - 1/2) s); every derived grid has an exact zero.

One scale serves every precision. `fit` chooses s per block:
  * "top": s = 2 absmax / (2^top - 1): the top grid spans [-absmax, absmax] exactly; derived
    p-bit grids then have a step 2^(top-p) s, a little finer than a direct p-bit fit (the top
    positive level clips: 7 * 16/17 of the direct 4-bit range);
  * "joint" (default): s = m * 2 absmax / (2^top - 1) with m, per block, the multiplier in
    `JOINT_MULTIPLIERS` that minimises the sum over `targets` (default 8, 6, 4 bits) of the block's
    squared error at that precision in units of its own step^2, so no precision's error dominates
    (the post-training stand-in for the paper's joint training of all precisions).
Either way s takes the sign that puts the derived grids' extra negative level on the side of the
block's largest weight (as the symmetric int grid does), which the grids' symmetry allows.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Grid, ParamField, Params, round_to_fp16

# multipliers of the top-bit absmax scale tried by fit="joint" (1.0625 = 17/16 is the 4-bit direct fit)
JOINT_MULTIPLIERS = (0.9375, 0.96875, 1.0, 1.015625, 1.03125, 1.046875, 1.0625, 1.09375)


def double_round(m: torch.Tensor, top: int, precision: int) -> torch.Tensor:
    """Stored signed top-bit integers m (float tensor) -> the signed `precision`-bit integers of
    the levels (m + 1/2) rounded again: round((m + 1/2) / 2^(top-p)), clamped (never a tie)."""
    k = top - precision
    q = torch.floor((m + 0.5) / 2**k + 0.5)
    return q.clamp(-(2 ** (precision - 1)), 2 ** (precision - 1) - 1)


def nested_values(m: torch.Tensor, top: int, precision: int) -> torch.Tensor:
    """The value of stored integers m at `precision`, in units of the stored scale s."""
    if precision == top:
        return m + 0.5
    return double_round(m, top, precision) * 2.0 ** (top - precision)


class NestedIntGrid(Grid):
    """`nested{top}`: top-bit symmetric integer codes, lower precisions by double rounding."""

    def __init__(
        self, top: int = 8, precision: int | None = None, fit: str = "joint", targets: Sequence[int] | None = None
    ) -> None:
        if not 3 <= top <= 8:
            raise ValueError(f"nested grids store 3 to 8 bits, got {top}")
        precision = top if precision is None else precision
        if isinstance(precision, bool) or int(precision) != precision or not 2 <= precision <= top:
            raise ValueError(f"precision of nested{top} is an integer from 2 to {top}, got {precision!r}")
        if fit not in ("top", "joint"):
            raise ValueError(f"nested fit is 'top' or 'joint', got {fit!r}")
        targets = tuple(sorted({int(t) for t in (targets or (top, max(2, top - 2), max(2, top - 4)))}, reverse=True))
        if not all(2 <= t <= top for t in targets):
            raise ValueError(f"targets are precisions from 2 to {top}, got {list(targets)}")
        self.bits = top  # width of a stored code
        self.top = top
        self.precision = int(precision)
        self.fit_rule = fit
        self.targets = targets

    @property
    def name(self) -> str:
        return f"nested{self.top}"

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"),)

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "precision": self.precision, "fit": self.fit_rule, "targets": list(self.targets)}

    def with_precision(self, bits: int) -> "NestedIntGrid":
        return NestedIntGrid(self.top, bits, self.fit_rule, self.targets)

    def _q_top(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        half = 2 ** (self.top - 1)
        return torch.floor(w / scale).clamp(-half, half - 1)

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        m = w.gather(1, w.abs().argmax(dim=1, keepdim=True))  # [rows, 1]: largest magnitude, signed
        absmax = m.abs()
        base = torch.where(absmax > 0, 2 * absmax / (2**self.top - 1), 1.0)  # [rows, 1]
        # the scale's sign puts every precision's extra negative level on the largest weight's side
        sign = torch.where(m > 0, -1.0, 1.0)
        if self.fit_rule == "top":
            return {"scale": round_to_fp16(base * sign)}
        scales = round_to_fp16(base * sign * torch.tensor(JOINT_MULTIPLIERS))  # [rows, n_mult]
        cost = torch.zeros_like(scales)
        for i in range(scales.shape[1]):
            s = scales[:, i : i + 1]
            q = self._q_top(w, s)
            for p in self.targets:
                step = 2.0 ** (self.top - p) * base[:, 0]  # the block's p-bit step at m = 1: a fixed unit per p
                err = ((nested_values(q, self.top, p) * s - w) ** 2).sum(dim=1)
                cost[:, i] += err / step**2
        best = cost.argmin(dim=1, keepdim=True)
        return {"scale": scales.gather(1, best)}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return (self._q_top(w.float(), params["scale"]) + 2 ** (self.top - 1)).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return nested_values(codes.float() - 2 ** (self.top - 1), self.top, self.precision) * params["scale"]
