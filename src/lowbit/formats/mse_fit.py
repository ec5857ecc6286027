"""Error-optimal group parameters as a grid option: `get_grid(name, mse_fit=True)` fits every block by
searching a range of shrink ratios and keeping, per block, the one whose rounded values are
closest to the weights, instead of the format's own min-max (absmax) fit.

Each candidate is the format's own fit on the block scaled by a ratio r <= 1 (`inner.fit(w * r)`):
for a scale-only grid that is the scale times r, for an asymmetric grid the range [lo, hi] times r,
for a coded scale (MXFP4's E8M0, NVFP4's E4M3) the code the shrunk block would get. So the search
works for every grid through its interface, and the stored parameters are an ordinary fit of the
grid: codes decode exactly as the wrapped grid decodes them, and `mse_fit` is recorded in the spec
for information only. The error is sum |w - q|^p over the block with p = 2.4, as in the GPTQ
reference's MSE parameter search (`find_params(mse=True)`, shrinking to 0.2 of the range on a grid
of 100), which weighs the large weights a little more than the mean square does.

Used inside RTN and GPTQ alike: GPTQ fits a group when its first column comes up, on the
error-corrected values, and the search runs there.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import FitWrapper, Params

NORM = 2.4  # the error's exponent
RATIOS = tuple(1.0 - i / 100 for i in range(0, 81, 1))  # 1.00, 0.99, ..., 0.20: the reference's grid


class MSEFitGrid(FitWrapper):
    """`inner` with every block's parameters chosen by the shrink search above."""

    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec(), "mse_fit": True}

    def fit(self, w: torch.Tensor) -> Params:
        """w: [rows, k] -> the inner grid's params ([rows, 1] each) with the least sum |w - q|^p per row."""
        w = w.float()
        best: Params | None = None
        best_err = torch.full((w.shape[0], 1), float("inf"))
        for r in RATIOS:
            params = self.inner.fit(w * r)
            err = (w - self.inner.quantize(w, params)).abs().pow(NORM).sum(dim=1, keepdim=True)  # [rows, 1]
            if best is None:
                best, best_err = params, err
                continue
            better = err < best_err  # ties keep the larger range (the first ratio)
            best = {k: torch.where(better, params[k], best[k]) for k in best}
            best_err = torch.where(better, err, best_err)
        return best
