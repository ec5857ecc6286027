"""Round-to-nearest: fit each group's parameters on its weights and round every weight."""

from __future__ import annotations

import torch

from ..formats import Grid, GroupLayout
from ..qtensor import QuantizedWeight


@torch.inference_mode()
def rtn_quantize(w: torch.Tensor, grid: Grid, layout: GroupLayout) -> QuantizedWeight:
    """`w: [out, in]` -> codes and parameters, every weight rounded to its nearest grid point."""
    w = w.float()
    params = layout.fit(grid, w)
    return QuantizedWeight(layout.encode(grid, w, params), params, grid, layout)
