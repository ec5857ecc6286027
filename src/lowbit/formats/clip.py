"""Clipping as a grid option: `get_grid(name, clip=c)` fits every block's scale at c times the
format's own choice (absmax onto the top level), so the c-fraction of the range is kept and the
largest weights saturate. 0 < c <= 1.

Only the fit changes; codes decode exactly as in the wrapped grid (the scale is stored as usual),
so `clip` is recorded in the spec for information and an artifact rebuilds the same decoder.
It applies to grids whose only per-block parameter is an fp16 `scale` (minifloats, NormalFloat,
lookup, power, log, symmetric int, ternary, binary); an asymmetric int grid's zero point or a
coded block scale (MXFP4, NVFP4) would not stay consistent with a multiplied scale.

Used by the LLM-FP4 clipping-range search (`algos.format_search`).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import FitWrapper, Grid, Params, round_to_fp16


class ClippedGrid(FitWrapper):
    """`inner` with every fitted fp16 scale multiplied by `clip` (see the module docstring)."""

    def __init__(self, inner: Grid, clip: float) -> None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < float(clip) <= 1:
            raise ValueError(f"clip is a number in (0, 1], got {clip!r}")
        fields = inner.param_fields
        if len(fields) != 1 or fields[0].name != "scale" or fields[0].kind != "float16":
            raise ValueError(
                f"clip applies to grids whose only parameter is an fp16 scale; {inner.name} stores "
                f"{', '.join(f.name for f in fields)} (an asymmetric int grid: add --sym, or symmetric: true in the recipe)"
            )
        super().__init__(inner)
        self.clip = float(clip)

    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec(), "clip": self.clip}

    def fit(self, w: torch.Tensor) -> Params:
        return {"scale": round_to_fp16(self.inner.fit(w)["scale"] * self.clip)}
