"""Per-layer format search: LLM-FP4's exponent-bits / clipping-range search (Liu et al., 2023,
"LLM-FP4: 4-Bit Floating-Point Quantized Transformers") and NUPES's power-exponent search
(Yvinec et al., 2023, "NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search").

Given a layer's weight W [out, in], its calibration Hessian H = 2 X^T X / n [in, in] and a
`SearchSpace` of candidate grids (`formats.search`), every candidate is applied with RTN and
scored by the layer's output error on the calibration inputs,

    err(Q) = tr((W - Q) H (W - Q)^T)    (= 2 ||W X^T - Q X^T||^2 / n),

and the candidate with the least error wins (the first one on a tie). With method "gptq" the
`space.refine` best candidates by RTN error are quantized again with GPTQ and scored the same
way; the best GPTQ result wins. A minifloat's exponent bias is not searched separately: with a
fitted scale it is a power-of-two scale shift, so the clipping factors of the search space cover
it (see `formats.search`).

The chosen grid's spec is stored with the layer, like any grid, so nothing else changes downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..formats import Grid, GroupLayout, SearchSpace
from ..qtensor import QuantizedWeight
from .gptq import GPTQConfig, gptq_quantize, output_error
from .rtn import rtn_quantize


@dataclass
class SearchResult:
    qw: QuantizedWeight  # the chosen candidate's weight
    chosen: int  # index into space.candidates
    rtn_errors: list[float]  # output error of every candidate with RTN
    gptq_errors: dict[int, float] = field(default_factory=dict)  # candidate index -> error with GPTQ (refined ones)

    @property
    def grid(self) -> Grid:
        return self.qw.grid

    @property
    def error(self) -> float:
        return self.gptq_errors.get(self.chosen, self.rtn_errors[self.chosen])

    def summary(self) -> dict:
        """JSON-able record of the search (for a quantization report)."""
        return {
            "candidates": len(self.rtn_errors),
            "chosen": self.qw.grid.spec(),
            "error": self.error,
            "rtn_errors": self.rtn_errors,
            "gptq_errors": {str(k): v for k, v in self.gptq_errors.items()},
        }


@torch.inference_mode()
def search_format(
    w: torch.Tensor,
    hessian: torch.Tensor,
    space: SearchSpace,
    layout: GroupLayout,
    method: str = "rtn",
    gptq_config: GPTQConfig = GPTQConfig(),
) -> SearchResult:
    """Choose the candidate of `space` with the least output error for `w: [out, in]` under
    `hessian: [in, in]`, quantized by `method` ("rtn" or "gptq"; see the module docstring)."""
    if method not in ("rtn", "gptq"):
        raise ValueError(f"format search quantizes with rtn or gptq, not {method!r}")
    w = w.float()
    rtn = [rtn_quantize(w, g, layout) for g in space.candidates]
    errors = [output_error(w, qw.dequantize(), hessian) for qw in rtn]
    order = sorted(range(len(errors)), key=lambda i: (errors[i], i))
    if method == "rtn":
        return SearchResult(rtn[order[0]], order[0], errors)
    refined = {i: gptq_quantize(w, hessian, space.candidates[i], layout, gptq_config) for i in order[: space.refine]}
    gptq_errors = {i: output_error(w, qw.dequantize(), hessian) for i, qw in refined.items()}
    chosen = min(gptq_errors, key=lambda i: (gptq_errors[i], i))
    return SearchResult(refined[chosen], chosen, errors, gptq_errors)
